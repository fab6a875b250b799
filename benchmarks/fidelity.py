"""The project's scoreboard: every estimator against retraining, on the same runs.

Digits (float64, a fixed batch list, plain SGD lr 0.1, batch 32, 1024 training samples,
8 epochs = 256 steps), logistic regression and an MLP 64-32-10, trained with a real Trainer.
Target: the mean validation cross-entropy over 300 held-out samples. For each model:

- LOO: Spearman / Pearson of the scores of `--samples` random training samples against exact
  trajectory-specific leave-one-out retraining (`evaluation.leave_one_out`).
- LDS: linear datamodeling score over `--subsets` random 50% subsets, retrained
  (`evaluation.subset_retraining`).
- AUC: mislabel-detection ROC-AUC (lowest scores first) on a second run of the same model with
  10% of the training labels flipped, and the share of flipped samples in the lowest 10%.
- seconds: time to scores for all N: for estimators that watch training, the fit time with the
  estimator's callback minus the plain fit time of the same run; plus the post-hoc scoring time.

Every estimator is built through the registry (`lightning_influence.estimators.build`), so a
row is exactly what a user gets from that name and those options. Estimators whose module is
missing or that fail are reported with the error instead of numbers.

    OMP_NUM_THREADS=1 python benchmarks/fidelity.py                      # both models, ~10-15 minutes
    OMP_NUM_THREADS=1 python benchmarks/fidelity.py --models logreg --samples 60 --subsets 24
    OMP_NUM_THREADS=1 python benchmarks/fidelity.py --only diffin-replay,tracin --json scoreboard.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import quiet_trainer  # noqa: E402
from revision import git_revision  # noqa: E402

from lightning_influence.data import FixedBatches, load_digits_tensors  # noqa: E402
from lightning_influence.estimators import Target, build  # noqa: E402
from lightning_influence.evaluation import (  # noqa: E402
    StepRecorder,
    detection_auroc,
    fraction_found,
    leave_one_out,
    linear_datamodeling_score,
    pearson,
    random_removals,
    spearman,
    subset_retraining,
)
from lightning_influence.models import Classifier  # noqa: E402

# label -> (registry name, options). One row of the table each.
ESTIMATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "diffin-replay": ("diffin", {"target": "val", "mode": "replay"}),
    # 256 steps: with the default window (256) online mode scores every step at the end of fit,
    # exactly; window 32 with blocks of 32 scores 7 of 8 blocks during fit with a truncated window.
    "diffin-online": ("diffin", {"target": "val", "mode": "online"}),
    "diffin-online-w32": ("diffin", {"target": "val", "mode": "online", "window": 32, "score_every": 32}),
    "diffin-paper": ("diffin_checkpoints", {}),
    # SGD-influence's counterfactual drops the sample's term and keeps the batch's 1/b; the ground truth
    # here re-averages the batch (the library's removal), so this row shows what that difference costs.
    "sgd-influence": ("sgd_influence", {"target": "val"}),
    "tracin": ("tracin", {}),
    "tracin-reaverage": ("tracin", {"batch_removal": "reaverage"}),
    "tracin-checkpoints": ("tracin_checkpoints", {}),
    "if-exact": ("influence_function", {"solver": "exact"}),
    "if-cg": ("influence_function", {"solver": "cg"}),
    "if-lissa": ("influence_function", {"solver": "lissa"}),
    "if-arnoldi": ("influence_function", {"solver": "arnoldi"}),
    "if-ekfac": ("influence_function", {"solver": "ekfac"}),
    "datainf": ("datainf", {}),
    "forward-inf": ("forward_inf", {}),
    "outlier-gradient": ("outlier_gradient", {}),
    "final-loss": ("loss", {}),
    "grand": ("grand", {}),
    "el2n": ("el2n", {}),
    "forgetting": ("forgetting", {}),
    "random": ("random", {}),
}


@dataclass
class Problem:
    train: FixedBatches
    val: FixedBatches
    n: int
    flipped: torch.Tensor  # bool[N]


def make_problem(n: int, epochs: int, flip_fraction: float, seed: int = 0, batch_size: int = 32, val_size: int = 300) -> Problem:
    x, y = load_digits_tensors(torch.float64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:n], perm[n : n + val_size]
    X, Y = x[tr], y[tr].clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    k = round(flip_fraction * n)
    if k:
        which = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:k]
        Y[which] = (Y[which] + torch.randint(1, 10, (k,), generator=g)) % 10
        flipped[which] = True
    batches = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        batches += [(X[order[i : i + batch_size]], Y[order[i : i + batch_size]], order[i : i + batch_size]) for i in range(0, n, batch_size)]
    val = [(x[va[i : i + 100]], y[va[i : i + 100]], torch.arange(i, min(i + 100, val_size))) for i in range(0, val_size, 100)]
    return Problem(FixedBatches(batches), FixedBatches(val), n, flipped)


def fit(hidden: tuple[int, ...], problem: Problem, callbacks: list[Any]) -> tuple[Classifier, float]:
    torch.manual_seed(0)
    model = Classifier(hidden=hidden, lr=0.1).double()
    start = time.perf_counter()
    quiet_trainer(callbacks=callbacks).fit(model, train_dataloaders=problem.train)
    return model, time.perf_counter() - start


def one_epoch(problem: Problem) -> FixedBatches:
    """Every training sample once (the loader post-hoc estimators iterate)."""
    steps = len(problem.train.batches) * problem.n // sum(len(b[2]) for b in problem.train.batches)
    return FixedBatches(problem.train.batches[:steps])


def score(label: str, hidden: tuple[int, ...], problem: Problem, plain_seconds: float) -> tuple[Any, float]:
    name, options = ESTIMATORS[label]
    if name in ("diffin", "sgd_influence", "tracin"):  # estimators that watch training take their target when built
        options = {**options, "target_loader": problem.val}
    estimator = build(name, **options)
    callback = estimator.callback()
    model, seconds = fit(hidden, problem, [callback] if callback is not None else [])
    recording = seconds - plain_seconds if callback is not None else 0.0
    start = time.perf_counter()
    scores = estimator.scores(model, one_epoch(problem), Target("val", problem.val))
    return scores, max(recording, 0.0) + time.perf_counter() - start


def column(scores: Any, ids: torch.Tensor) -> torch.Tensor:
    values = scores.values if scores.values.dim() == 1 else scores.values.sum(dim=1)
    position = {int(i): k for k, i in enumerate(scores.ids.tolist())}
    return values[[position[int(i)] for i in ids]]


def measure(hidden: tuple[int, ...], labels: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    model_name = "logreg" if not hidden else "mlp-" + "-".join(map(str, hidden))
    clean = make_problem(args.n, args.epochs, 0.0)
    noisy = make_problem(args.n, args.epochs, args.flip)
    recorder = StepRecorder()
    model, _ = fit(hidden, clean, [recorder])
    _, plain_clean = fit(hidden, clean, [])
    _, plain_noisy = fit(hidden, noisy, [])
    start = time.perf_counter()
    ids = torch.randperm(clean.n, generator=torch.Generator().manual_seed(1))[: args.samples]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, clean.val)
    removals = random_removals(range(clean.n), args.subsets, keep_fraction=0.5, seed=2)
    subsets = subset_retraining(model, recorder.initial_params, recorder.steps, recorder.optimizer, removals, clean.val)
    print(f"[{model_name}] ground truth: {args.samples} leave-one-out + {args.subsets} subset retrainings in {time.perf_counter() - start:.0f}s", flush=True)
    all_ids = torch.arange(clean.n)
    rows = []
    for label in labels:
        row: dict[str, Any] = {"model": model_name, "estimator": label}
        try:
            scores, seconds = score(label, hidden, clean, plain_clean)
            est = column(scores, ids)
            row.update(
                spearman=spearman(est, truth),
                pearson=pearson(est, truth),
                lds=linear_datamodeling_score(subsets, all_ids, column(scores, all_ids)),
                seconds=seconds,
            )
            noisy_scores, _ = score(label, hidden, noisy, plain_noisy)
            values = column(noisy_scores, all_ids)
            row.update(auroc=detection_auroc(values, noisy.flipped), found_top10=fraction_found(values, noisy.flipped, 0.1))
        except Exception as err:  # a missing or failing estimator is a row with its error, not a crash
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            if args.verbose:
                traceback.print_exc()
        print(f"[{model_name}] {label}: {row}", flush=True)
        rows.append(row)
    return rows


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


#: digits has 1797 samples; 300 of them are the validation set
MAX_TRAINING_SAMPLES = 1797 - 300


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, models: dict[str, Any]) -> None:
    """Refuse, as argparse errors before any training, the settings the ground truth cannot use."""
    unknown = [m for m in args.models.split(",") if m not in models]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(models)}")
    if not 2 <= args.n <= MAX_TRAINING_SAMPLES:
        parser.error(f"--n must be between 2 and {MAX_TRAINING_SAMPLES} (digits' samples less the 300 validation ones), got {args.n}")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if not 3 <= args.samples <= args.n:
        parser.error(f"--samples (leave-one-out retrainings) must be between 3 (for a rank correlation) and --n={args.n}, got {args.samples}")
    if args.subsets < 3:
        parser.error(f"--subsets must be at least 3: an LDS correlates the predicted and retrained losses over the subsets, got {args.subsets}")
    if not 0 < args.flip < 1:
        parser.error(f"--flip (the fraction of flipped labels for the detection AUC) must be between 0 and 1, exclusive, got {args.flip}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="logreg,mlp", help="comma-separated: logreg, mlp")
    parser.add_argument("--only", default=None, help=f"comma-separated estimator labels (default all): {', '.join(ESTIMATORS)}")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=100, help="leave-one-out retrainings per model")
    parser.add_argument("--subsets", type=int, default=64, help="50%% subsets for the LDS")
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of flipped labels for the detection AUC")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing estimators")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = list(ESTIMATORS) if args.only is None else args.only.split(",")
    unknown = [lab for lab in labels if lab not in ESTIMATORS]
    if unknown:
        parser.error(f"unknown estimator labels {unknown}; choose from {list(ESTIMATORS)}")
    hidden_of = {"logreg": (), "mlp": (32,)}
    check_arguments(parser, args, hidden_of)
    start = time.perf_counter()
    rows = []
    for model in args.models.split(","):
        rows += measure(hidden_of[model], labels, args)
    print(
        f"\nlightning_influence {git_revision(str(Path(__file__).resolve().parents[1]), 'lightning_influence')}, torch {torch.__version__}; digits float64, SGD lr 0.1, batch 32, "
        f"{args.n} samples, {args.epochs} epochs; LOO on {args.samples} samples, LDS on {args.subsets} 50% subsets, "
        f"detection with {args.flip:.0%} flipped labels; {time.perf_counter() - start:.0f}s in all.\n"
    )
    print("| model | estimator | LOO Spearman | LOO Pearson | LDS | mislabel AUC | flipped in lowest 10% | seconds to scores |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['estimator']} | n/a: {r['error']} | | | | | |")
            continue
        print(
            f"| {r['model']} | {r['estimator']} | {fmt(r['spearman'])} | {fmt(r['pearson'])} | {fmt(r['lds'])} "
            f"| {fmt(r.get('auroc'))} | {fmt(r.get('found_top10'), 2)} | {fmt(r['seconds'], 1)} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
