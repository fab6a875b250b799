"""Resident memory of long training runs with the DiffIn callback: does it stay O(N + P)?

Trains a small MLP on a large synthetic classification set (default 1,000,000 samples, 32 float32
features, 10 classes, fixed seed, wrapped in ``IndexedDataset``) with a real ``lightning.Trainer``
on CPU, and records the process's resident set size (``VmRSS`` of ``/proc/self/status``) over the
whole run: from a background thread every ``--interval`` seconds, and from a small callback every
``--log-every`` optimizer steps. Each configuration runs in a fresh subprocess, so that peaks and
allocator state do not mix.

Configurations (``--configs``):
  baseline       plain training, no DiffIn
  online-compact DiffIn(mode="online", window=64, score_every=128): the default ratios, with the
                 compact trajectory (parameters every 8 steps, the steps between rebuilt in each
                 sweep); bounded like online
  online         DiffIn(mode="online", window=64, score_every=64, checkpoint_every=1): at most
                 window + score_every recorded steps
                 in memory, so RSS must stop growing after the first window
  replay-disk    DiffIn(mode="replay", storage="disk"): every step is spilled to disk, RSS must
                 stay flat while the trajectory on disk grows linearly
  replay-memory  DiffIn(mode="replay", storage="memory") for --memory-steps steps only: the
                 documented linear growth (one record of parameters + gradient + batch per step)

What may grow: the float64 score accumulator (N * 8 bytes, plus an N-byte "seen" mask) and a few
parameter-sized vectors (P * 4 bytes each), both O(N + P) and reached within the first steps; the
recorded trajectory is bounded by the mode (online: window + score_every steps; disk: none in
memory). Nothing may grow with the number of steps.

The check: the least-squares slope of memory against step over the second half of the run must
not exceed ``--max-slope-fraction`` (default 1%) of P * 4 bytes per step in the bounded modes. A
record is ~2 * P * 4 bytes plus its batch, so keeping even one parameter-sized vector every 100
steps (or a batch's ids every step) exceeds the bar. A bounded window is a saw-tooth (amplitude A,
period T = score_every), which would bias a fit over L steps by up to ~A * T / L^2; online runs are
therefore fitted only at the steps where the window is fullest, one phase of the cycle. The memory
checked is VmRSS minus the bytes that glibc's malloc holds as free chunks (``mallinfo2().fordblks``):
with glibc's default dynamic mmap threshold, freed tensor blocks stay in the heap, and VmRSS moves
in steps of tens of MiB that are allocator state, not objects in use; it can also hide a real leak
that fills such free chunks (both slopes are printed). The script exits with status 1 if a bounded
mode fails the check; ``--leak-bytes-per-step`` injects a leak to show that the check catches one.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/memory.py                       # all five, ~6 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/memory.py --quick               # smoke check, ~1.5 min
    OMP_NUM_THREADS=1 python benchmarks/memory.py --configs online,replay-disk --steps 4000 --json mem.json
    OMP_NUM_THREADS=1 python benchmarks/memory.py --malloc-mmap-threshold 131072   # glibc's threshold fixed
    OMP_NUM_THREADS=1 python benchmarks/memory.py --quick --leak-bytes-per-step 6144  # must exit 1

Prints a Markdown table on stdout (progress on stderr). Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

from revision import git_revision  # benchmarks/revision.py

os.environ.setdefault("OMP_NUM_THREADS", "1")

CONFIGS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "baseline": ("plain training (no DiffIn)", None),
    "online": ("DiffIn online, window {window}", {"mode": "online"}),
    "online-compact": ("DiffIn online, window {window}, blocks of 2 windows, parameters every 8 steps", {"mode": "online"}),
    "replay-disk": ("DiffIn replay, storage='disk'", {"mode": "replay", "storage": "disk"}),
    "replay-memory": ("DiffIn replay, storage='memory'", {"mode": "replay", "storage": "memory"}),
}
BOUNDED = ("online", "online-compact", "replay-disk")  # modes whose memory must not grow with the number of steps
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


# --------------------------------------------------------------------------- /proc/self/status, glibc
def read_status() -> dict[str, int]:
    """Selected fields of /proc/self/status, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def rss() -> int:
    return read_status()["VmRSS"]


def take_peak() -> int:
    """VmHWM (the kernel's exact peak RSS) since the last call, then reset it to the current RSS
    (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0; without it the peak stays cumulative)."""
    peak = read_status()["VmHWM"]
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    return peak


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]


def _load_mallinfo2() -> Any:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = _MallInfo2, []
    return fn


_MALLINFO2 = _load_mallinfo2()


def malloc_free_bytes() -> int | None:
    """Bytes that glibc's malloc holds as free chunks (``fordblks``, all arenas): memory the process
    has touched and still counts in its RSS, but that no object uses. ``None`` without glibc."""
    return int(_MALLINFO2().fordblks) if _MALLINFO2 is not None else None


class RssSampler(threading.Thread):
    """Samples the RSS every ``interval`` seconds into ``samples`` as ``(seconds since start, bytes)``.

    Reads ``/proc/self/statm`` through a descriptor opened once and stores into a list allocated up
    front: the thread makes only small Python objects (pymalloc), never a glibc ``malloc``, so that
    it does not change the allocator state it measures."""

    def __init__(self, interval: float, t0: float, capacity: int = 1 << 17) -> None:
        super().__init__(daemon=True)
        self.interval, self.t0 = interval, t0
        self._slots: list[tuple[float, int] | None] = [None] * capacity
        self._count = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        if self._count < len(self._slots):
            resident = int(os.pread(self._fd, 128, 0).split()[1]) * self._page
            self._slots[self._count] = (time.perf_counter() - self.t0, resident)
            self._count += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self._sample()
        os.close(self._fd)

    @property
    def samples(self) -> list[tuple[float, int]]:
        return self._slots[: self._count]  # type: ignore[return-value]


def dir_bytes(path: str | None) -> tuple[int, int]:
    """(bytes, files) of the regular files in ``path`` and its subfolders, at any depth (DiffIn
    spills into a folder of its own, ``spill_dir/diffin-trajectory-XXXX``); symbolic links are not
    followed, and files or folders that the sweep deletes meanwhile are skipped."""
    if not path or not os.path.isdir(path):
        return 0, 0
    total = files = 0
    folders = [path]
    while folders:
        try:
            it = os.scandir(folders.pop())
        except (FileNotFoundError, NotADirectoryError):  # deleted meanwhile
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        files += 1
                except FileNotFoundError:  # deleted by the sweep meanwhile
                    pass
    return total, files


# --------------------------------------------------------------------------- one configuration (worker)
def synthetic_data(n: int, dim: int, classes: int, seed: int, split: int) -> tuple[Any, Any]:
    """Gaussian blobs, one per class (centers drawn from ``seed``), unit noise; ``split`` picks an
    independent draw of the samples. Generated in chunks, so the peak stays at the data's size."""
    import torch

    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) * (2.0 / dim**0.5)
    g = torch.Generator().manual_seed(seed * 1000 + 1 + split)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    chunk = 1 << 14
    buffer = torch.empty(chunk, dim)  # reused: no temporaries left behind in the allocator
    for start in range(0, n, chunk):
        index = y[start : start + chunk]
        shift = buffer[: index.numel()]
        torch.index_select(centers, 0, index, out=shift)
        x[start : start + chunk].add_(shift)
    return x, y


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    sampler = RssSampler(args.interval, t0)
    sampler.start()
    marks: dict[str, int] = {"start": rss()}

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import lightning as L
    import lightning_influence
    from lightning.pytorch.callbacks import Callback
    from lightning_influence.callbacks.diffin import DiffIn
    from lightning_influence.data import IndexedDataset
    from lightning_influence.models import Classifier

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    marks["imports"] = rss()

    config = args.worker
    steps = args.memory_steps if config == "replay-memory" else args.steps
    x, y = synthetic_data(args.samples, args.features, args.classes, args.seed, split=0)
    x_val, y_val = synthetic_data(args.val_samples, args.features, args.classes, args.seed, split=1)
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    target_loader = DataLoader(IndexedDataset(TensorDataset(x_val, y_val)), batch_size=1024)
    marks["data"] = rss()

    torch.manual_seed(args.seed)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    model = Classifier(args.features, args.classes, hidden=hidden, lr=args.lr)
    num_params = sum(p.numel() for p in model.parameters())
    # One recorded step: parameters and batch gradient (P float32 each, forward differences reuse the
    # gradient) + the batch (x, y, ids) + the ids again as a separate tensor.
    batch_bytes = args.batch_size * (args.features * x.element_size() + y.element_size() + 8)
    record_bytes = 2 * num_params * 4 + batch_bytes + args.batch_size * 8

    spill_dir = None
    diffin = None
    options = CONFIGS[config][1]
    if options is not None:
        options = dict(options)
        if config == "online":
            # Blocks of one window, every step recorded: the bound documented with these tables.
            options.update(window=args.window, score_every=args.window, checkpoint_every=1)
        elif config == "online-compact":
            # The default ratios: blocks of twice the window, steps between checkpoints rebuilt in each sweep.
            options.update(window=args.window, score_every=2 * args.window)
        if options.get("storage") == "disk":
            root = args.spill_root or tempfile.gettempdir()
            need = steps * record_bytes * 1.2
            free = shutil.disk_usage(root).free
            if free < need:
                raise SystemExit(
                    f"replay-disk needs ~{need / 2**30:.1f} GiB in {root} for {steps} steps, "
                    f"{free / 2**30:.1f} GiB free: pass --spill-root or fewer --steps"
                )
            spill_dir = tempfile.mkdtemp(prefix="diffin-memory-bench-", dir=root)
            options["spill_dir"] = spill_dir
        diffin = DiffIn(target="val", target_loader=target_loader, **options)

    # (optimizer steps done, seconds, VmRSS, glibc free bytes or None, at the same phase of the online block cycle)
    step_log: list[tuple[int, float, int, int | None, bool]] = []
    # Online mode holds between window and window + score_every records, a saw-tooth of period score_every;
    # RSS is also logged at the steps where the window is fullest (just before a sweep drops a block), so
    # that the slope can be fitted at one phase of the cycle.
    block = diffin.score_every if diffin is not None and diffin.mode == "online" else None
    disk = {"peak_bytes": 0, "peak_files": 0}
    peaks: dict[str, int] = {}  # exact peak RSS per phase: up to setup, the steps, the end of fit
    leaked: list[Any] = []  # --leak-bytes-per-step: a deliberate leak, to test that the check catches one

    def log_step(step: int, at_block: bool = False) -> None:
        step_log.append((step, time.perf_counter() - t0, rss(), malloc_free_bytes(), at_block))

    class RssProbe(Callback):
        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            marks["setup"] = rss()  # data, model, optimizer, DiffIn's accumulator: before the first step
            peaks["setup"] = take_peak()
            log_step(0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            step = trainer.global_step
            if args.leak_bytes_per_step and config != "baseline":
                leaked.append(torch.ones(max(1, args.leak_bytes_per_step // 4)))
            at_block = block is not None and step >= args.window + block and (step - args.window) % block == 0
            if step % args.log_every == 0 or step == steps or step == 1 or at_block:
                log_step(step, at_block)
                if step == steps:
                    peaks["steps"] = take_peak()
                if spill_dir is not None:
                    size, files = dir_bytes(spill_dir)
                    if size > disk["peak_bytes"]:
                        disk["peak_bytes"], disk["peak_files"] = size, files

    # The probe goes first: its on_train_batch_end runs before an online sweep frees the oldest block,
    # so it sees the fullest window.
    callbacks: list[Callback] = [RssProbe()] + ([diffin] if diffin is not None else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    fit_start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    fit_end = time.perf_counter()
    marks["after_fit"] = rss()
    peaks["end_of_fit"] = take_peak()
    last_step_time = step_log[-1][1]
    sampler.stop()
    if spill_dir is not None:
        shutil.rmtree(spill_dir, ignore_errors=True)

    meta = dict(diffin.scores.metadata) if diffin is not None and diffin.scores is not None else {}
    during = [r for t, r in sampler.samples if t <= last_step_time]
    after = [r for t, r in sampler.samples if t > last_step_time]
    return {
        "config": config,
        "label": CONFIGS[config][0].format(window=args.window),
        "steps": steps,
        "steps_done": int(trainer.global_step),
        "samples": args.samples,
        "batch_size": args.batch_size,
        "num_params": num_params,
        "hidden": hidden,
        "marks": marks,
        "peak_rss": max(peaks.values()),  # the kernel's high-water marks: exact, not sampled
        "peaks": peaks,
        "peak_rss_sampled_steps": max(during) if during else None,
        "peak_rss_sampled_end_of_fit": max(after) if after else None,
        "step_log": step_log,
        "rss_samples": sampler.samples,
        "fit_seconds": fit_end - fit_start,
        "steps_seconds": last_step_time - step_log[0][1],
        "end_of_fit_seconds": fit_end - t0 - last_step_time,
        "wall_seconds": time.perf_counter() - t0,
        "disk_peak_bytes": disk["peak_bytes"],
        "disk_peak_files": disk["peak_files"],
        "record_bytes_estimate": record_bytes if diffin is not None else 0,
        "batch_bytes": batch_bytes,
        "glibc_mallinfo2": _MALLINFO2 is not None,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "diffin": {
            k: meta.get(k)
            for k in ("mode", "window", "score_every", "steps_seen", "steps_scored", "hessian_products",
                      "target_gradients", "callback_seconds")
        },
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "lightning_influence": os.path.dirname(os.path.abspath(lightning_influence.__file__)),
    }


# --------------------------------------------------------------------------- analysis (parent)
def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx if sxx else float("nan")


def rss_at(step_log: list[list[Any]], step: int) -> int:
    """RSS logged at the first logged step >= ``step``."""
    for entry in step_log:
        if entry[0] >= step:
            return int(entry[2])
    return int(step_log[-1][2])


def analyse(result: dict[str, Any], max_slope_fraction: float) -> dict[str, Any]:
    steps = result["steps_done"]
    second_half = [e for e in result["step_log"] if e[0] >= steps / 2]
    at_block = [e for e in second_half if e[4]]
    if len(at_block) >= 3:  # online: fit at one phase of the block cycle (no saw-tooth bias)
        second_half = at_block
    raw = slope([(e[0], e[2]) for e in second_half])
    has_net = all(e[3] is not None for e in second_half)
    net = slope([(e[0], e[2] - e[3]) for e in second_half]) if has_net else float("nan")
    limit = max_slope_fraction * result["num_params"] * 4
    checked_slope = net if has_net else raw
    bounded = result["config"] in BOUNDED
    return {
        "rss_quarters": [rss_at(result["step_log"], round(q * steps)) for q in (0.25, 0.5, 0.75, 1.0)],
        "slope_rss": raw,
        "slope_net": net,
        "checked_slope_kind": "net" if has_net else "rss",
        "slope_points": len(second_half),
        "slope_at_block_phase": second_half is at_block,
        "slope_limit": limit,
        "checked": bounded,
        "passed": bool(checked_slope <= limit) if bounded else None,
    }


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def kib(n: float) -> str:
    return "-" if n != n else f"{n / 1024:,.1f}"


def markdown(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["config"] == "baseline"), None)
    lines = [
        "| config | steps | peak RSS | peak - baseline peak | after setup | 25% | 50% | 75% | 100% "
        "| slope, 2nd half: RSS | slope, 2nd half: RSS net of glibc free | bar | check "
        "| N*8 | P*4 | trajectory on disk (peak) | wall s (steps + end of fit) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        a = r["analysis"]
        q = a["rss_quarters"]
        check = ("pass" if a["passed"] else "**FAIL**") if a["checked"] else "-"
        disk = f"{mib(r['disk_peak_bytes'])} MiB, {r['disk_peak_files']:,} files" if r["disk_peak_files"] else "-"
        over = mib(r["peak_rss"] - base["peak_rss"]) if base is not None and r is not base else "-"
        lines.append(
            f"| {r['label']} | {r['steps_done']:,} | {mib(r['peak_rss'])} | {over} | {mib(r['marks']['setup'])} | "
            f"{mib(q[0])} | {mib(q[1])} | {mib(q[2])} | {mib(q[3])} | {kib(a['slope_rss'])} | {kib(a['slope_net'])} | "
            f"{kib(a['slope_limit'])} | {check} | {mib(r['samples'] * 8)} | {mib(r['num_params'] * 4)} | {disk} | "
            f"{r['wall_seconds']:.0f} ({r['steps_seconds']:.0f} + {r['end_of_fit_seconds']:.0f}) |"
        )
    return "\n".join(lines)


def details(r: dict[str, Any]) -> str:
    a, marks = r["analysis"], r["marks"]
    text = (
        f"- {r['config']}: RSS after imports {mib(marks['imports'])}, after data {mib(marks['data'])}, after fit "
        f"{mib(marks['after_fit'])}; peak up to setup {mib(r['peaks'].get('setup'))}, during the steps "
        f"{mib(r['peaks'].get('steps'))} (sampled: {mib(r['peak_rss_sampled_steps'])}), during the end of fit "
        f"{mib(r['peaks'].get('end_of_fit'))} (sampled: {mib(r['peak_rss_sampled_end_of_fit'])})"
    )
    record = r["record_bytes_estimate"]
    if record:
        text += f"; one recorded step ~{kib(record)} KiB (2 x P*4 + batch {kib(r['batch_bytes'])} KiB + ids)"
        if r["config"] == "replay-memory":
            text += (
                f"; growth per step / record size: RSS {a['slope_rss'] / record:.2f}, "
                f"net of glibc free {a['slope_net'] / record:.2f}"
            )
        if r["config"] in ("online", "online-compact"):
            held = r["diffin"]["window"] + r["diffin"]["score_every"]
            text += f"; documented bound {held} records ~{mib(held * record)} MiB"
        d = r["diffin"]
        text += (
            f"; DiffIn: {d['steps_scored']} steps scored, {d['hessian_products']} Hessian products, "
            f"{d['target_gradients']} target gradients, {d['callback_seconds']:.0f}s in the callback"
        )
    return text


def worker_argv(args: argparse.Namespace, config: str, result_path: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", config, "--result", result_path]
    for key in ("samples", "features", "classes", "hidden", "batch_size", "lr", "steps", "memory_steps", "window",
                "log_every", "interval", "val_samples", "seed", "threads", "leak_bytes_per_step"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.spill_root:
        argv += ["--spill-root", args.spill_root]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {','.join(CONFIGS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check in about 1.5 minutes")
    parser.add_argument(
        "--samples", type=int, default=None, help="training samples N (default 1,000,000; quick 100,000)"
    )
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", default="256,256", help="hidden widths of the tanh MLP, comma-separated")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of baseline/online/replay-disk (default 2000; quick 400)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=None, help="optimizer steps of replay-memory (default 300; quick 100)"
    )
    parser.add_argument(
        "--window", type=int, default=None, help="online mode's window, score_every = window (default 64; quick 16)"
    )
    parser.add_argument(
        "--log-every", type=int, default=None, help="log RSS every k optimizer steps (default 10; quick 5)"
    )
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between background RSS samples")
    parser.add_argument("--val-samples", type=int, default=2048, help="size of the fixed target (validation) loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--spill-root", default=None, help="folder for replay-disk's spill dir, created if missing (default: system temp)")
    parser.add_argument(
        "--max-slope-fraction",
        type=float,
        default=0.01,
        help="bar of the bounded modes: second-half slope <= this fraction of P*4 bytes per step",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (a fixed threshold: blocks above it are "
        "mmapped and returned to the OS when freed), to compare with the default dynamic threshold",
    )
    parser.add_argument(
        "--leak-bytes-per-step",
        type=int,
        default=0,
        help="self-test of the check: keep a new tensor of this many bytes at every step in the DiffIn runs",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number (and the RSS time series) there")
    parser.add_argument("--worker", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spill_root:
        if os.path.exists(args.spill_root) and not os.path.isdir(args.spill_root):
            parser.error(f"--spill-root {args.spill_root} is a file, not a folder: pass a folder (it is created if missing)")
        try:
            os.makedirs(args.spill_root, exist_ok=True)
        except OSError as err:
            parser.error(f"--spill-root {args.spill_root}: the folder cannot be created ({err}); pass a writable folder")
    defaults = {"samples": (1_000_000, 100_000), "steps": (2000, 400), "memory_steps": (300, 100),
                "window": (64, 16), "log_every": (10, 5)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)

    if args.worker:
        result = run_worker(args)
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    if not os.path.exists("/proc/self/status"):
        parser.error("this benchmark reads /proc/self/status (Linux only)")
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {','.join(CONFIGS)}")
    if not configs:
        parser.error("no configuration selected")

    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        for c in configs:
            path = os.path.join(tmp, f"{c}.json")
            print(f"[{c}] running in a fresh process ...", file=sys.stderr, flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if args.malloc_mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            proc = subprocess.run(worker_argv(args, c, path), env=env)
            if proc.returncode != 0:
                print(f"[{c}] worker failed with status {proc.returncode}", file=sys.stderr)
                return 2
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            result["analysis"] = analyse(result, args.max_slope_fraction)
            a = result["analysis"]
            print(
                f"[{c}] {result['steps_done']} steps in {result['wall_seconds']:.0f}s, peak RSS "
                f"{mib(result['peak_rss'])} MiB, second-half slope {kib(a['slope_rss'])} KiB/step "
                f"({kib(a['slope_net'])} net of glibc free)",
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
    elapsed = time.perf_counter() - t0

    r0 = results[0]
    print(markdown(results))
    print()
    if args.leak_bytes_per_step:
        print(f"- SELF-TEST: the DiffIn runs leak {args.leak_bytes_per_step:,} bytes per step on purpose")
    print(
        f"- data: N = {r0['samples']:,} samples x {args.features} float32 features, {args.classes} classes (Gaussian "
        f"blobs, seed {args.seed}) in IndexedDataset, shuffled, batch {args.batch_size}; target 'val' on a fixed "
        f"loader of {args.val_samples} samples; model: tanh MLP {args.features}-{'-'.join(map(str, r0['hidden']))}-"
        f"{args.classes}, P = {r0['num_params']:,} float32 parameters, plain SGD lr {args.lr}; one process per row"
    )
    print(
        "- RSS in MiB (VmRSS of /proc/self/status). peak: the kernel's VmHWM, taken and reset at on_train_start, "
        "at the last step and after fit (so it includes the end-of-fit sweep). after setup: at on_train_start (data, "
        "model, DiffIn's score accumulator allocated, but its zeroed pages are not resident until written). "
        "25-100%: logged at that fraction of the steps, before an online "
        "sweep of that step frees its block"
    )
    print(
        f"- slopes in KiB per optimizer step: least-squares fit over the second half of the steps (RSS logged every "
        f"{args.log_every} steps). 'net of glibc free': VmRSS minus the bytes glibc's malloc holds as free chunks "
        f"(mallinfo2 fordblks), i.e. memory in use; it is the slope checked (raw RSS without glibc >= 2.33). "
        f"Online: fitted only at the steps where the window is fullest (one point per score_every steps). "
        f"bar: {args.max_slope_fraction:g} x P*4 bytes per step, checked for {', '.join(BOUNDED)}"
    )
    for r in results:
        print(details(r))
    threshold = r0["malloc_mmap_threshold"]
    revision = git_revision(r0["lightning_influence"])
    print(
        f"- torch {r0['versions']['torch']}, lightning {r0['versions']['lightning']}, lightning_influence from "
        f"{r0['lightning_influence']}{f' ({revision})' if revision else ''}; {args.threads} torch thread(s), "
        f"{os.cpu_count()} CPU(s); glibc malloc "
        f"{'MALLOC_MMAP_THRESHOLD_=' + threshold if threshold else 'defaults (dynamic mmap threshold)'}; "
        f"total {elapsed:.0f}s"
    )

    failed = [r["config"] for r in results if r["analysis"]["passed"] is False]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results, "failed": failed, "total_seconds": elapsed}, f, indent=1)
    if failed:
        print(
            "\nFAIL: memory in use keeps growing with the number of steps in bounded-memory mode(s): "
            + ", ".join(failed)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
