"""Wall-clock overhead of the DiffIn callback: fit time with it / fit time without it.

Everything runs in ONE process: a warm-up fit first (imports, first-call overheads), then for
each configuration ``--repeats`` rounds of one plain fit and one callback fit, interleaved (the
order alternates between rounds so that slow drifts of the machine hit both equally). The
reported ratio is the median over rounds of (callback fit seconds / plain fit seconds of the
same round). Every fit starts from the same initial weights and sees the same batches.

Workloads:
  digits  the embedded digits MLP 64-32-10, float32, batch 32, 1500 training samples, 8 epochs
  cnn     a small CNN on the same digits as 8x8 images (conv 16, strided conv 32, linear; 9,930
          parameters), float32, batch 32, 8 epochs
  synth   an MLP 256-1024-768-10 (~1.06M parameters), float32, synthetic Gaussian-mixture data,
          4096 samples, batch 64, 3 epochs = 192 steps
  bn-cnn  the cnn with BatchNorm2d after each convolution (convolutions without bias), scored as
          trained by the default batch_norm="auto" (not in the default --workloads)

Configurations: ``replay`` (including its end-of-fit reverse sweep; parameters stored every 8
steps), with every step's parameters stored (``checkpoint_every=1``), with the cheaper
``hessian_every=2`` and with the exact ``per_sample="forward_mode"`` (the default takes per-sample
derivatives by finite differences of the losses); ``online`` with the defaults (whose window
covers these short runs), with ``hessian_every=2``, and with a small window so that the windowed scoring really runs during
fit: at the default ratios (blocks of twice the window, parameters stored every 8 steps) and at
the previous defaults' (blocks of one window, every step recorded). On batch-norm workloads also
``replay-bn-exact`` (``batch_norm_removal="exact"``), ``replay-bn-running`` (evaluation mode) and
``replay-bn-unfolded`` (the running statistics in a gradient pass of their own instead of folded
into the Hessian products' passes, as before 2026-12-02), which are not in the default ``--configs``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--quick] [--repeats N] [--json PATH]
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --profile synth:replay   # cProfile one fit
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --optimizer adamw        # train with AdamW (or momentum)
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --configs online --min-steps 2048   # online in steady state
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --workloads cnn,bn-cnn --configs replay,replay-bn-exact,replay-bn-running

Prints a Markdown table on stdout. Numbers are ratios from one run on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning as L  # noqa: E402
from lightning_influence.callbacks.diffin import DiffIn  # noqa: E402
from lightning_influence.data import IndexedDataset, load_digits_tensors  # noqa: E402
from lightning_influence.models import Classifier, SmallCNN  # noqa: E402
from revision import git_revision  # noqa: E402  (benchmarks/revision.py)

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- workloads
# --optimizer choices: (torch.optim name, learning-rate factor on the workload's SGD rate, options)
OPTIMIZERS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "sgd": ("sgd", 1.0, {}),
    "momentum": ("sgd", 0.1, {"momentum": 0.9}),
    "adamw": ("adamw", 0.01, {"weight_decay": 0.01}),
}


@dataclass
class Workload:
    name: str
    description: str
    in_features: int
    hidden: tuple[int, ...]
    num_classes: int
    lr: float
    batch_size: int
    epochs: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    small_window: int
    cnn_channels: tuple[int, int] | None = None  # a SmallCNN on 8x8 images instead of the MLP
    batch_norm: bool = False  # the SmallCNN with BatchNorm2d after each convolution
    init_state: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        torch.manual_seed(1234)
        self.init_state = copy.deepcopy(self.new_model(load=False).state_dict())

    def new_model(self, load: bool = True) -> Classifier:
        name, lr, options = OPTIMIZERS[self.optimizer]
        if self.cnn_channels is not None:
            model: Classifier = SmallCNN(
                side=int(self.in_features**0.5), num_classes=self.num_classes, channels=self.cnn_channels,
                lr=self.lr * lr, optimizer=name, optimizer_options=options, batch_norm=self.batch_norm,
            )
        else:
            model = Classifier(
                self.in_features, self.num_classes, hidden=self.hidden, lr=self.lr * lr, optimizer=name, optimizer_options=options
            )
        if load:
            model.load_state_dict(self.init_state)
        return model

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.init_state.values())

    @property
    def steps(self) -> int:
        per_epoch = -(-len(self.x_train) // self.batch_size)
        return per_epoch * self.epochs

    def train_loader(self) -> DataLoader:
        # A fresh seeded generator per fit: every fit sees the same batch sequence.
        g = torch.Generator().manual_seed(0)
        dataset = IndexedDataset(TensorDataset(self.x_train, self.y_train))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_loader(self) -> DataLoader:
        return DataLoader(IndexedDataset(TensorDataset(self.x_val, self.y_val)), batch_size=512)


def digits_workload(quick: bool) -> Workload:
    x, y = load_digits_tensors(torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1500], perm[1500:]
    return Workload(
        name="digits",
        description="digits MLP 64-32-10, 1500 train / 297 val, batch 32",
        in_features=64,
        hidden=(32,),
        num_classes=10,
        lr=0.1,
        batch_size=32,
        epochs=2 if quick else 8,
        x_train=x[tr],
        y_train=y[tr],
        x_val=x[va],
        y_val=y[va],
        small_window=16,
    )


def cnn_workload(quick: bool) -> Workload:
    digits = digits_workload(quick)
    return Workload(
        name="cnn",
        description="digits SmallCNN conv3x3(16)-conv3x3/2(32)-linear on 8x8 images, 1500 train / 297 val, batch 32",
        in_features=64,
        hidden=(),
        num_classes=10,
        lr=0.05,
        batch_size=32,
        epochs=digits.epochs,
        x_train=digits.x_train,
        y_train=digits.y_train,
        x_val=digits.x_val,
        y_val=digits.y_val,
        small_window=16,
        cnn_channels=(16, 32),
    )


def bn_cnn_workload(quick: bool) -> Workload:
    """The CNN with batch norm after each convolution (without bias): batch norm scored as trained."""
    cnn = cnn_workload(quick)
    return dataclasses.replace(
        cnn, name="bn-cnn", description=cnn.description.replace("SmallCNN", "SmallCNN with BatchNorm2d,"), batch_norm=True
    )


def gaussian_mixture(
    n: int, dim: int, classes: int, per_class: int, g: torch.Generator, centers: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``classes * per_class`` Gaussian blobs (unit noise); blob ``k`` belongs to class ``k % classes``."""
    if centers is None:
        centers = torch.randn(classes * per_class, dim, generator=g) * (1.5 / dim**0.5) * 4
    comp = torch.randint(0, classes * per_class, (n,), generator=g)
    x = centers[comp] + torch.randn(n, dim, generator=g)
    return x.float(), (comp % classes).long(), centers


def synthetic_workload(quick: bool) -> Workload:
    g = torch.Generator().manual_seed(1)
    dim, classes = (256, 10)
    n_train, n_val = (1024, 512) if quick else (4096, 1024)
    x_tr, y_tr, centers = gaussian_mixture(n_train, dim, classes, 3, g)
    x_va, y_va, _ = gaussian_mixture(n_val, dim, classes, 3, g, centers)
    hidden = (256,) if quick else (1024, 768)
    return Workload(
        name="synth",
        description=(
            f"MLP {dim}-{'-'.join(map(str, hidden))}-{classes}, "
            f"Gaussian mixture {n_train} train / {n_val} val, batch 64"
        ),
        in_features=dim,
        hidden=hidden,
        num_classes=classes,
        lr=0.05,
        batch_size=64,
        epochs=2 if quick else 3,
        x_train=x_tr,
        y_train=y_tr,
        x_val=x_va,
        y_val=y_va,
        small_window=8 if quick else 16,
    )


# --------------------------------------------------------------------------- callback with memory probe
class MeasuredDiffIn(DiffIn):
    """DiffIn that also records the peak size of its recorded trajectory (outside ``seconds``):
    the bytes of every tensor its records hold, counted whenever the window is at its fullest."""

    peak_steps = 0
    peak_bytes = 0
    probe_seconds = 0.0  # taken off the fit's time (wall and CPU) by fit()
    fold_statistics = True  # False: batch norm's running statistics in a gradient pass of their own (the earlier code path)

    def on_fit_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        super().on_fit_start(trainer, pl_module)
        if self._sweep is not None:
            self._sweep.fold_statistics = self.fold_statistics

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        trajectory = self._trajectory
        if trajectory is None:
            return
        n = len(trajectory)
        if n and n >= self.peak_steps:
            start = time.perf_counter()
            self.peak_bytes = max(self.peak_bytes, _trajectory_bytes(trajectory._records))
            self.probe_seconds += time.perf_counter() - start
        self.peak_steps = max(self.peak_steps, n)


def _trajectory_bytes(records: Any) -> int:
    seen: set[int] = set()
    total = 0
    for record in records:
        leaves = (record.batches, record.ids, record.hyper, record.theta, record.grad, record.state, record.context)
        for t in torch.utils._pytree.tree_leaves(leaves):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


# name -> (label, DiffIn options); "{small}" stands for the workload's small window, "{small2}" for twice it.
CONFIG_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "replay": ("replay (default)", {"mode": "replay"}),
    "replay-every-step": ("replay, every step recorded (checkpoint_every=1, the earlier default)", {"mode": "replay", "checkpoint_every": 1}),
    "replay-k2": ("replay, hessian_every=2", {"mode": "replay", "hessian_every": 2}),
    "replay-jvp": ("replay, per_sample=forward_mode", {"mode": "replay", "per_sample": "forward_mode"}),
    "replay-bn-exact": (
        "replay, batch_norm_removal=exact (each batch re-evaluated without each sample)",
        {"mode": "replay", "batch_norm_removal": "exact"},
    ),
    "replay-bn-running": ("replay, batch_norm=running (evaluation mode)", {"mode": "replay", "batch_norm": "running"}),
    "replay-bn-unfolded": (
        "replay, batch norm's running statistics in a gradient pass of their own (before 2026-12-02: not folded into the products)",
        {"mode": "replay", "fold_statistics": False},
    ),
    "online": ("online (defaults: window 256, blocks of 512)", {"mode": "online"}),
    "online-k2": ("online, hessian_every=2 (defaults otherwise)", {"mode": "online", "hessian_every": 2}),
    "online-forward": (
        "online, finite_difference=forward (one gradient pass per product also on kinked networks)",
        {"mode": "online", "finite_difference": "forward"},
    ),
    "online-small": ("online (window {small}, blocks of {small2}, checkpoints every 8: the default ratios)", {"mode": "online", "window": "{small}"}),
    "online-small-previous": (
        "online (window {small}, blocks of {small}, every step recorded: the previous defaults' ratios)",
        {"mode": "online", "window": "{small}", "score_every": "{small}", "checkpoint_every": 1},
    ),
}
CONFIGS = tuple(CONFIG_OPTIONS)


def make_callback(config: str, workload: Workload) -> MeasuredDiffIn:
    _, options = CONFIG_OPTIONS[config]
    sizes = {"{small}": workload.small_window, "{small2}": 2 * workload.small_window}
    options = {k: sizes.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    fold = options.pop("fold_statistics", True)
    callback = MeasuredDiffIn(target="val", target_loader=workload.val_loader(), **options)
    callback.fold_statistics = fold
    return callback


def config_label(config: str, workload: Workload) -> str:
    return CONFIG_OPTIONS[config][0].format(small=workload.small_window, small2=2 * workload.small_window)


# --------------------------------------------------------------------------- fits
def fit(workload: Workload, callback: DiffIn | None) -> tuple[float, float]:
    """One ``Trainer.fit``: (wall seconds, process CPU seconds), without the memory probe's time."""
    model = workload.new_model()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=workload.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback] if callback is not None else [],
    )
    loader = workload.train_loader()
    cpu = time.process_time()
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    probe = callback.probe_seconds if isinstance(callback, MeasuredDiffIn) else 0.0
    return time.perf_counter() - start - probe, time.process_time() - cpu - probe


def measure(workload: Workload, config: str, repeats: int) -> dict[str, Any]:
    plain, with_cb, ratios, cb_seconds = [], [], [], []
    plain_cpu, with_cb_cpu, cpu_ratios = [], [], []
    last: MeasuredDiffIn | None = None
    for r in range(repeats):
        order = ("plain", "cb") if r % 2 == 0 else ("cb", "plain")
        times: dict[str, tuple[float, float]] = {}
        for kind in order:
            if kind == "plain":
                times[kind] = fit(workload, None)
            else:
                cb = make_callback(config, workload)
                times[kind] = fit(workload, cb)
                cb_seconds.append(cb.seconds)
                last = cb
        plain.append(times["plain"][0])
        with_cb.append(times["cb"][0])
        ratios.append(with_cb[-1] / plain[-1])
        plain_cpu.append(times["plain"][1])
        with_cb_cpu.append(times["cb"][1])
        cpu_ratios.append(with_cb_cpu[-1] / plain_cpu[-1])
        print(
            f"  [{workload.name} {config} round {r + 1}/{repeats}] plain {plain[-1]:.2f}s (cpu {plain_cpu[-1]:.2f}s)  "
            f"callback {with_cb[-1]:.2f}s (cpu {with_cb_cpu[-1]:.2f}s)  "
            f"ratio {ratios[-1]:.2f} (cpu {cpu_ratios[-1]:.2f})",
            file=sys.stderr,
            flush=True,
        )
    assert last is not None and last.scores is not None
    meta = dict(last.scores.metadata)
    return {
        "workload": workload.name,
        "config": config,
        "label": config_label(config, workload),
        "seconds_plain": plain,
        "seconds_callback": with_cb,
        "ratios": ratios,
        "callback_seconds": cb_seconds,
        "median_seconds_plain": statistics.median(plain),
        "median_seconds_callback": statistics.median(with_cb),
        "median_ratio": statistics.median(ratios),
        "cpu_seconds_plain": plain_cpu,
        "cpu_seconds_callback": with_cb_cpu,
        "cpu_ratios": cpu_ratios,
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "median_callback_seconds": statistics.median(cb_seconds),
        "steps": meta.get("steps_seen"),
        "hessian_products": meta.get("hessian_products"),
        "forward_mode_passes": meta.get("forward_mode_passes"),
        "target_gradients": meta.get("target_gradients"),
        "finite_difference": meta.get("finite_difference"),
        "window": meta.get("window"),
        "score_every": meta.get("score_every"),
        "peak_trajectory_steps": last.peak_steps,
        "peak_trajectory_bytes": last.peak_bytes,
        "samples_scored": len(last.scores),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(results: list[dict[str, Any]], workloads: dict[str, Workload]) -> str:
    lines = [
        "| workload | params | steps | mode | plain s | callback fit s | ratio (wall) | ratio (CPU) | in callback s "
        "| Hessian products | forward-mode passes | target grads | peak trajectory |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        w = workloads[r["workload"]]
        lines.append(
            f"| {w.name} | {w.num_parameters:,} | {r['steps']} | {r['label']} | {r['median_seconds_plain']:.2f} | "
            f"{r['median_seconds_callback']:.2f} | **{r['median_ratio']:.2f}x** | {r['median_cpu_ratio']:.2f}x | "
            f"{r['median_callback_seconds']:.2f} | "
            f"{r['hessian_products']} | {r['forward_mode_passes']} | {r['target_gradients']} | "
            f"{r['peak_trajectory_steps']} steps, {_mib(r['peak_trajectory_bytes'])} |"
        )
    return "\n".join(lines)


def profile_one(workload: Workload, config: str, top: int, out: str | None = None) -> None:
    # Warm up as the timed rounds do (a plain fit and a first callback fit): the profile shows a
    # steady-state fit, not one-time imports or the first mapping of the trajectory's memory.
    fit(workload, None)
    fit(workload, make_callback(config, workload))
    cb = make_callback(config, workload)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    model = workload.new_model()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=workload.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb],
    )
    trainer.fit(model, train_dataloaders=workload.train_loader())
    profiler.disable()
    total = time.perf_counter() - start
    if out:
        profiler.dump_stats(out)
    print(
        f"profile of one {workload.name} {config} fit: {total:.2f}s wall (under cProfile), "
        f"{cb.seconds:.2f}s in the callback"
    )
    print(f"metadata: {json.dumps({k: v for k, v in cb.scores.metadata.items()})}")
    for key in ("tottime", "cumtime"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(top)
        print(f"\n--- sorted by {key} ---")
        print(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check in well under a minute")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved plain/callback rounds per configuration (default 3, quick 1)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--workloads", default="digits,cnn,synth", help="comma-separated subset of: digits,cnn,synth,bn-cnn")
    parser.add_argument(
        "--configs",
        default=",".join(c for c in CONFIGS if not c.startswith("replay-bn-")),
        help=f"comma-separated subset of: {','.join(CONFIGS)}",
    )
    parser.add_argument(
        "--profile", metavar="WORKLOAD:CONFIG", help="instead: cProfile one callback fit, e.g. synth:replay"
    )
    parser.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="train every workload for enough epochs to run at least this many steps (e.g. 2048: online mode "
        "in its steady state, where the default window no longer covers the run)",
    )
    parser.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS), help="the optimizer every fit trains with")
    parser.add_argument("--top", type=int, default=30, help="rows of the profile to print")
    parser.add_argument("--profile-out", metavar="PATH", help="with --profile: also dump the raw cProfile stats there")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    makers = {"digits": digits_workload, "cnn": cnn_workload, "bn-cnn": bn_cnn_workload, "synth": synthetic_workload}
    if args.profile:
        name, _, config = args.profile.partition(":")
        if name not in makers or config not in CONFIGS:
            parser.error(f"--profile takes WORKLOAD:CONFIG with WORKLOAD in {sorted(makers)} and CONFIG in {CONFIGS}")
        workload = makers[name](args.quick)
        workload.optimizer = args.optimizer
        if args.min_steps:
            workload.epochs = max(workload.epochs, -(-args.min_steps // (workload.steps // workload.epochs)))
        profile_one(workload, config, args.top, args.profile_out)
        return 0

    names = [n for n in args.workloads.split(",") if n]
    configs = [c for c in args.configs.split(",") if c]
    for n in names:
        if n not in makers:
            parser.error(f"unknown workload {n!r}")
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}")

    t0 = time.perf_counter()
    workloads = {n: makers[n](args.quick) for n in names}
    for w in workloads.values():
        w.optimizer = args.optimizer
        if args.min_steps:
            per_epoch = w.steps // w.epochs
            w.epochs = max(w.epochs, -(-args.min_steps // per_epoch))
    # Warm-up: one plain and one callback fit on the smallest workload (imports, lazy init, autograd paths).
    warm = workloads[names[0]]
    fit(warm, None)
    fit(warm, make_callback(configs[0], warm))
    print(f"warm-up done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    results = []
    cold: dict[str, tuple[float, float]] = {}
    for n in names:
        # Per-workload warm-up: a plain fit, then the first callback fit of this workload, which
        # maps its trajectory memory for the first time (page faults). Its time is reported apart
        # as the cold start; the measured rounds then compare configurations in the same state.
        plain_s, _ = fit(workloads[n], None)
        cold_s, _ = fit(workloads[n], make_callback(configs[0], workloads[n]))
        cold[n] = (plain_s, cold_s)
        for c in configs:
            results.append(measure(workloads[n], c, repeats))
    elapsed = time.perf_counter() - t0

    table = markdown(results, workloads)
    print(table)
    print()
    for n in names:
        plain_s, cold_s = cold[n]
        print(
            f"- cold start, {n}: the first {configs[0]} fit of the process (fresh trajectory memory) took "
            f"{cold_s:.2f}s against {plain_s:.2f}s plain ({cold_s / plain_s:.2f}x)"
        )
    for n in names:
        w = workloads[n]
        print(
            f"- {w.name}: {w.description}, {w.epochs} epochs = {w.steps} steps, "
            f"{w.num_parameters:,} float32 parameters"
        )
    print(
        f"- ratio: median over {repeats} interleaved round(s) of callback-fit / plain-fit time of the same round, "
        f"wall clock "
        f"and process CPU time (less sensitive to other load on a shared machine); seconds are medians of wall time; "
        f"replay includes its end-of-fit sweep; 'in callback' is DiffIn.seconds (wall). "
        f"torch {torch.__version__}, lightning {L.__version__}, "
        f"{torch.get_num_threads()} thread(s), total {elapsed:.0f}s"
    )
    print(
        "- peak trajectory: most recorded steps held at once, and the bytes of every tensor their records hold "
        "(parameters, gradients, optimizer state, batches) when the window is fullest"
    )

    if args.json:
        payload = {
            "quick": args.quick,
            "repeats": repeats,
            "total_seconds": elapsed,
            "environment": {
                "git": git_revision(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lightning_influence"),
                "torch": torch.__version__,
                "lightning": L.__version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
            },
            "workloads": {
                n: {
                    "description": w.description,
                    "parameters": w.num_parameters,
                    "steps": w.steps,
                    "epochs": w.epochs,
                    "batch_size": w.batch_size,
                }
                for n, w in workloads.items()
            },
            "results": results,
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
