"""Estimators on batch-norm models against exact leave-one-out retraining (the baseline to improve).

Digits as in `fidelity.py` (float64, a fixed batch list, 300 held-out samples as the target), but
the networks normalise with batch norm: `bn-mlp` (Linear 64-32 without bias, BatchNorm1d, tanh,
Linear 32-10) and `bn-cnn` (conv 3x3 8 channels, BatchNorm2d, tanh, conv 3x3 stride 2 16 channels,
BatchNorm2d, tanh, Linear 256-10; the convolutions without bias), trained by a real Trainer with
plain SGD (`sgd`, lr 0.1) or SGD with momentum 0.9 (`momentum`, lr 0.05). The ground truth is
`evaluation.leave_one_out` of `--samples` random training samples: each run normalises its own
sub-batches (the sample taken out of its batches' statistics) and keeps its own running statistics,
which its eval-mode target loss uses. Rows: Spearman / Pearson of each estimator's scores (built by
name through the registry, default options, as in `fidelity.py`) against that truth.

    OMP_NUM_THREADS=1 python benchmarks/batchnorm_fidelity.py                       # bn-mlp, sgd and momentum
    OMP_NUM_THREADS=1 python benchmarks/batchnorm_fidelity.py --models bn-mlp,bn-cnn --optimizers sgd
    OMP_NUM_THREADS=1 python benchmarks/batchnorm_fidelity.py --only diffin-replay --json bn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import ESTIMATORS, MAX_TRAINING_SAMPLES, Problem, column, fmt, make_problem, one_epoch  # noqa: E402
from conftest import quiet_trainer  # noqa: E402  (fidelity puts tests/ on the path)
from revision import git_revision  # noqa: E402

from lightning_influence.estimators import Target, build  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402

# optimizer label -> (Classifier optimizer, learning rate, options)
OPTIMIZERS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "sgd": ("sgd", 0.1, {}),
    "momentum": ("sgd", 0.05, {"momentum": 0.9}),
}


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"bn-mlp": bn_mlp, "bn-cnn": bn_cnn}


class Normed(Classifier):
    """:class:`Classifier` (its loss, steps and optimizers) around the network ``body``."""

    def __init__(self, body: nn.Module, optimizer: str, lr: float, options: dict[str, Any]) -> None:
        with warnings.catch_warnings():  # Classifier saves its callers' arguments as hyperparameters: body among them
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            super().__init__(hidden=(), lr=lr, optimizer=optimizer, optimizer_options=options)
        self.net = body


def fit(model_name: str, optimizer: str, problem: Problem, callbacks: list[Any]) -> Normed:
    torch.manual_seed(0)
    name, lr, options = OPTIMIZERS[optimizer]
    model = Normed(MODELS[model_name](), name, lr, options).double()
    quiet_trainer(callbacks=callbacks).fit(model, train_dataloaders=problem.train)
    return model


def scores_of(label: str, model_name: str, optimizer: str, problem: Problem) -> Any:
    """The estimator ``label`` of ``fidelity.ESTIMATORS``, default options, on a fresh fit of the same run."""
    name, options = ESTIMATORS[label]
    if name in ("diffin", "sgd_influence", "tracin"):  # estimators that watch training take their target when built
        options = {**options, "target_loader": problem.val}
    estimator = build(name, **options)
    callback = estimator.callback()
    model = fit(model_name, optimizer, problem, [callback] if callback is not None else [])
    return estimator.scores(model, one_epoch(problem), Target("val", problem.val))


def measure(model_name: str, optimizer: str, labels: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    problem = make_problem(args.n, args.epochs, 0.0, batch_size=args.batch_size)
    recorder = StepRecorder()  # checks at the end of fit that the retraining reproduces parameters and running statistics
    model = fit(model_name, optimizer, problem, [recorder])
    start = time.perf_counter()
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[: args.samples]
    truth: Tensor = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    run = f"{model_name}/{optimizer}"
    print(f"[{run}] {len(recorder.steps)} steps; leave-one-out of {args.samples} samples in {time.perf_counter() - start:.0f}s; "
          f"|truth| max {float(truth.abs().max()):.3g}", flush=True)
    rows = []
    for label in labels:
        row: dict[str, Any] = {"model": model_name, "optimizer": optimizer, "estimator": label}
        try:
            start = time.perf_counter()
            est = column(scores_of(label, model_name, optimizer, problem), ids)
            row.update(spearman=spearman(est, truth), pearson=pearson(est, truth), seconds=time.perf_counter() - start)
        except Exception as err:  # a failing estimator is a row with its error, not a crash
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        print(f"[{run}] {label}: {row}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn-mlp", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--optimizers", default="sgd,momentum", help=f"comma-separated: {', '.join(OPTIMIZERS)}")
    parser.add_argument("--only", default="diffin-replay,diffin-online,tracin", help="comma-separated labels of fidelity.py's estimators")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=100, help="leave-one-out retrainings per run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models, optimizers, labels = args.models.split(","), args.optimizers.split(","), args.only.split(",")
    for given, known, flag in ((models, MODELS, "--models"), (optimizers, OPTIMIZERS, "--optimizers"), (labels, ESTIMATORS, "--only")):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {flag} {unknown}; choose from {list(known)}")
    if not 2 <= args.n <= MAX_TRAINING_SAMPLES or args.epochs < 1 or args.batch_size < 3 or not 3 <= args.samples <= args.n:
        parser.error(f"need 2 <= --n <= {MAX_TRAINING_SAMPLES}, --epochs >= 1, --batch-size >= 3 (batch norm), 3 <= --samples <= --n")
    start = time.perf_counter()
    rows = [row for m in models for o in optimizers for row in measure(m, o, labels, args)]
    print(
        f"\nlightning_influence {git_revision(str(Path(__file__).resolve().parents[1]), 'lightning_influence')}, torch {torch.__version__}; "
        f"digits float64, batch {args.batch_size}, {args.n} samples, {args.epochs} epochs; LOO on {args.samples} samples; "
        f"{time.perf_counter() - start:.0f}s in all.\n"
    )
    print("| model | optimizer | estimator | LOO Spearman | LOO Pearson | seconds |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['optimizer']} | {r['estimator']} | n/a: {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['optimizer']} | {r['estimator']} | {fmt(r['spearman'])} | {fmt(r['pearson'])} | {fmt(r['seconds'], 1)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
