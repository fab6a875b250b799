"""Accuracy of DiffIn against leave-one-out retraining, per mode and online window.

Digits (float64, fixed batch list, plain SGD, batch 32, 1024 training samples), trained with a
real Trainer: logistic regression and an MLP 64-32-10 (tanh) by default; `--models` also takes
`mlp-relu`, `mlp-gelu`, `cnn-relu`, `cnn-gelu` (SmallCNN, channels 4 and 8). The ground truth
retrains without each of `--samples` random samples (lightning_influence.evaluation.leave_one_out).
Prints a Markdown table of Spearman (and Pearson) correlations, for exact propagation, for
`hessian_every=k` (one Hessian product per block of k steps) and for replay with the exact
`per_sample="forward_mode"` (the default takes finite differences of the losses); `--windows`
takes online windows as `W` or `W:S` (`score_every=S`); `--json PATH` also writes the numbers.

    OMP_NUM_THREADS=1 python benchmarks/diffin_windows.py       # 256 and 512 steps, ~2 minutes
    OMP_NUM_THREADS=1 python benchmarks/diffin_windows.py --models cnn-relu cnn-gelu --epochs 12 --lr 0.1 0.03 --windows 128:128 --hessian-every 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import digits_problem, quiet_trainer  # noqa: E402

from lightning_influence import DiffIn  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman  # noqa: E402
from lightning_influence.models import Classifier, SmallCNN  # noqa: E402


MODELS = {
    "logreg": lambda lr: Classifier(hidden=(), lr=lr),
    "mlp": lambda lr: Classifier(hidden=(32,), lr=lr),
    "mlp-relu": lambda lr: Classifier(hidden=(32,), lr=lr, activation="relu"),
    "mlp-gelu": lambda lr: Classifier(hidden=(32,), lr=lr, activation="gelu"),
    "cnn-relu": lambda lr: SmallCNN(channels=(4, 8), lr=lr, activation="relu"),
    "cnn-gelu": lambda lr: SmallCNN(channels=(4, 8), lr=lr, activation="gelu"),
}


def window_option(text: str) -> tuple[int, int | None]:
    """``"W"`` (score_every = window) or ``"W:S"``."""
    window, _, every = text.partition(":")
    return int(window), int(every) if every else None


def measure(
    name: str,
    lr: float,
    epochs: int,
    windows: list[tuple[int, int | None]],
    strides: list[int],
    samples: int,
    strided_windows: list[tuple[int, int | None]] | None = None,
) -> list[dict]:
    problem = digits_problem(n=1024, batch_size=32, epochs=epochs)
    # (mode, (window, score_every), hessian_every, per_sample)
    configs = [("replay", None, 1, "auto"), ("replay", None, 1, "forward_mode")]
    configs += [("replay", None, k, "auto") for k in strides] + [("online", w, 1, "auto") for w in windows]
    strided = strided_windows if strided_windows is not None else [w for w in windows if w == (128, 128)]
    configs += [("online", w, k, "auto") for w in strided for k in strides]
    callbacks = []
    for mode, w, k, per_sample in configs:
        options = {"window": w[0], "score_every": w[1]} if w else {}
        cb = DiffIn(target="val", mode=mode, target_loader=problem.val, hessian_every=k, per_sample=per_sample, **options)
        cb._generate_state_key = (lambda key: (lambda **kw: key))(f"DiffIn-{mode}-{w}-{k}-{per_sample}")  # several instances
        callbacks.append(cb)
    torch.manual_seed(0)
    model = MODELS[name](lr).double()
    recorder = StepRecorder()
    quiet_trainer(callbacks=[recorder, *callbacks]).fit(model, train_dataloaders=problem.train)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:samples]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    rows = []
    for (mode, w, k, per_sample), cb in zip(configs, callbacks):
        est = torch.stack([cb.scores[int(i)] for i in ids])
        rows.append(
            dict(
                model=name,
                lr=lr,
                steps=len(recorder.steps),
                mode=mode + (", per_sample=forward_mode" if per_sample == "forward_mode" else ""),
                window=w[0] if w else None,
                score_every=cb.scores.metadata["score_every"],
                hessian_every=k,
                hessian_products=cb.scores.metadata["hessian_products"],
                spearman=round(spearman(est, truth), 4),
                pearson=round(pearson(est, truth), 4),
                truncated_steps=cb.scores.metadata["steps_scored_truncated"],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[8, 16])
    parser.add_argument(
        "--windows", type=window_option, nargs="+", default=[(32, 32), (64, 64), (128, 128)],
        help="online windows: W:S (window W, score_every S), or W for the default score_every (2 W)",
    )
    parser.add_argument("--hessian-every", type=int, nargs="+", default=[2, 4, 8], dest="strides")
    parser.add_argument(
        "--strided-windows", type=window_option, nargs="+", default=None,
        help="online windows also run with each --hessian-every (default: 128:128 when among --windows)",
    )
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"], choices=sorted(MODELS))
    parser.add_argument("--lr", type=float, nargs="+", default=[0.1], help="SGD learning rates (each model, each)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for lr in args.lr:
        for epochs in args.epochs:
            for name in args.models:
                rows += measure(name, lr, epochs, args.windows, args.strides, args.samples, args.strided_windows)
    print(
        "| model | lr | steps | mode | window | score_every | hessian_every | Hessian products "
        "| steps scored with a truncated window | Spearman | Pearson |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['lr']:g} | {r['steps']} | {r['mode']} | {r['window'] or '-'} | {r['score_every'] or '-'} "
            f"| {r['hessian_every']} | {r['hessian_products']} "
            f"| {r['truncated_steps']} | {r['spearman']:.3f} | {r['pearson']:.3f} |"
        )
    print(f"\n{args.samples} leave-one-out retrainings per model and length; {time.perf_counter() - start:.0f}s in all.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
