"""Accuracy of DiffIn per optimizer and training setting, against leave-one-out retraining with
the same optimizer, schedule, clipping and accumulation.

Digits MLP 64-32-10 (tanh), float64, 1024 training samples, a fixed list of batches of 32,
32 epochs (1024 optimizer steps; 341 with accumulation over 3 micro-batches), trained with a
real Trainer. The ground truth retrains without each of ``--samples`` random samples with the
real torch.optim optimizer (lightning_influence.evaluation.leave_one_out). Modes: ``replay``
(exact linearised sweep), ``online`` (the defaults: window 256, blocks of 512; the first 512
steps are scored with a truncated propagation), and for Adam-type optimizers ``replay`` with
``second_moment="frozen"``.
Prints a Markdown table of Spearman correlations (Pearson in parentheses).

    OMP_NUM_THREADS=1 python benchmarks/optimizers.py           # all setups, ~6 minutes
    OMP_NUM_THREADS=1 python benchmarks/optimizers.py adam sgd  # some of them
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from optimizer_cases import CASES, measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=list(CASES), help=f"among {list(CASES)}")
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose among {list(CASES)}")
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rows = []
    for name in args.cases:
        case = CASES[name]
        configs = {"replay": {}, "online": {"mode": "online"}}
        if case.optimizer != "sgd":
            configs["replay, frozen v"] = {"second_moment": "frozen"}
        result = measure(case, configs, epochs=args.epochs, samples=args.samples)
        rows.append({"case": name, **result})
        print(f"{name}: done ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)

    def cell(row: dict, key: str) -> str:
        r = row.get(key)
        return f"{r['spearman']:.3f} ({r['pearson']:.3f})" if r else "-"

    print("| setup | optimizer steps | replay | online (defaults) | replay, frozen Adam second moment |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['steps']} | {cell(row, 'replay')} | {cell(row, 'online')} | {cell(row, 'replay, frozen v')} |")
    print(f"\n{args.samples} leave-one-out retrainings per setup; {time.perf_counter() - start:.0f}s in all.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
