"""Peak memory of the sweep's passes with and without ``chunk_size``.

DiffIn's reverse sweep evaluates, per recorded step, a forward-mode pass (per-sample directional
derivatives) and a gradient pass at a shifted point (the finite-difference Hessian product), over
each micro-batch. ``DiffIn(chunk_size=k)`` runs both over chunks of at most k samples, so their
memory stops growing with the batch size. This script measures it: an MLP of ``--width`` units and
``--layers`` hidden layers on one batch of ``--batch`` random samples, float32, one CPU thread; each
pass runs in a fresh subprocess, which reports the growth of its peak resident memory (``VmHWM`` of
``/proc/self/status``) over the pass, relative to the state just before it (inputs, parameters
and tangent already allocated). It also checks that the chunked results equal the whole-batch ones.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/chunking.py                  # batch 65536, chunks of 1024 and 8192, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/chunking.py --batch 16384 --chunks 512 4096

Prints a Markdown table on stdout (Linux only: reads ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _vm(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _child(kind: str, width: int, layers: int, batch: int, chunk: int | None) -> None:
    import torch

    from lightning_influence.kernels import ParameterSpace, directional_derivatives, losses_and_gradient, per_sample_loss_function
    from lightning_influence.models import Classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(in_features=width, num_classes=10, hidden=(width,) * layers)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    data = (x, y, torch.arange(batch))
    space = ParameterSpace.from_parameters(list(model.named_parameters()))
    theta = space.flatten(dict(model.named_parameters()))
    tangent = torch.randn(space.size, generator=torch.Generator().manual_seed(1))
    loss_fn = per_sample_loss_function(model)
    before = _vm("VmRSS")
    start = time.perf_counter()
    if kind == "forward-mode":
        _, out = directional_derivatives(loss_fn, space.unflatten(theta), data, space.unflatten(tangent), chunk)
        check = out.double()
    else:
        losses, grad = losses_and_gradient(loss_fn, space, theta, data, chunk)
        check = torch.cat([grad.double()[:2048], losses.double()[:2048]])
    seconds = time.perf_counter() - start
    peak = _vm("VmHWM") - before
    print(json.dumps({"peak_bytes": peak, "seconds": seconds, "result": check.tolist()[:4096], "params": space.size}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, width, layers, batch, chunk = args.child
        _child(kind, int(width), int(layers), int(batch), None if chunk == "none" else int(chunk))
        return 0
    print(
        f"MLP {args.width} x {args.layers} hidden layers, one batch of {args.batch} samples, float32, 1 thread; "
        "peak memory growth of one pass (fresh process each)\n"
    )
    print("| pass | chunk_size | peak memory growth | seconds | max relative difference to the whole batch |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("forward-mode", "gradient"):
        reference = None
        for chunk in [None, *args.chunks]:
            command = [sys.executable, __file__, "--child", kind, str(args.width), str(args.layers), str(args.batch), str(chunk).lower()]
            out = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            result = out["result"]
            if reference is None:
                reference, diff = result, 0.0
            else:
                scale = max(abs(v) for v in reference) or 1.0
                diff = max(abs(a - b) for a, b in zip(result, reference)) / scale
            print(
                f"| {kind} | {chunk or 'none'} | {out['peak_bytes'] / 2**20:.1f} MiB | {out['seconds']:.2f} | "
                f"{'-' if chunk is None else f'{diff:.1e}'} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
