"""Batch-norm models: estimators against exact leave-one-out retraining, and what that retraining costs.

Digits as in `fidelity.py` (float64, a fixed batch list, 300 held-out samples as the target, whose
loss is read in evaluation mode), trained by a real Trainer. Models (`--models`):

- `bn-mlp`: Linear 64-32 without bias, BatchNorm1d, tanh, Linear 32-10;
- `bn-cnn`: conv 3x3 8 channels, BatchNorm2d, tanh, conv 3x3 stride 2 16 channels, BatchNorm2d,
  tanh, Linear 256-10 (the convolutions without bias); `bn-cnn-relu`: the same with ReLU;
- `mlp-nobn`: the reference without batch norm (Linear 64-32 with bias, tanh, Linear 32-10);
- `bn-mlp-cumulative` (BatchNorm1d(momentum=None)) and `bn-mlp-no-running-stats`
  (BatchNorm1d(track_running_stats=False)): variants of `bn-mlp`.

Optimizers (`--optimizers`): plain SGD (`sgd`, lr 0.1) or SGD with momentum 0.9 (`momentum`, lr
0.05), both times `--lr-scale`. Parts (`--parts`):

- `fidelity`: for each model and optimizer, Spearman / Pearson of each estimator's scores against
  `evaluation.leave_one_out` of `--samples` random training samples (each run normalises its own
  sub-batches, the sample taken out of its batches' statistics, and keeps its own running
  statistics, which its evaluation-mode target uses). Rows (`--only`) are built by name through
  the registry with default options: any label of `fidelity.py`'s estimators, or a DiffIn row
  `diffin-{replay,online}[-window<k>][-{auto,batch,running}][-{linear,exact}]` (`-window<k>`: online
  with window and blocks of k steps; the first suffix sets `batch_norm`, default DiffIn's own,
  `"auto"`: as trained, `"batch"`, on batch-norm models; the second `batch_norm_removal`, default
  `"auto"`: `"linear"` here). Also shown: the `batch_norm` mode DiffIn scored with, its largest
  adjoint growth, and the seconds to scores (fit with the estimator's callback less a plain fit,
  plus post-hoc scoring, as in `fidelity.py`).
- `speed`: seconds of `leave_one_out` of `--samples` samples and of `subset_retraining` of
  `--subsets` random half-subsets, for each of `--speed-models` trained with `momentum` on the same
  digits (best of `--repeats`). A batch-norm run removing a sample evaluates its own sub-batch
  (batch statistics without the sample), so it cannot share the full batch's evaluation.

Scores are target-loss changes when the sample is removed (positive: the sample helps).

    OMP_NUM_THREADS=1 python benchmarks/batch_norm.py          # bn-mlp and bn-cnn, sgd and momentum, both parts
    OMP_NUM_THREADS=1 python benchmarks/batch_norm.py --parts fidelity --models bn-mlp,mlp-nobn \
        --only diffin-replay,diffin-online-window16
    OMP_NUM_THREADS=1 python benchmarks/batch_norm.py --parts fidelity --n 1024 --epochs 8 --lr-scale 2 --json bn.json
    OMP_NUM_THREADS=1 python benchmarks/batch_norm.py --parts speed --speed-models mlp-nobn,bn-mlp --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import re
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
from lightning_influence.evaluation import (  # noqa: E402
    StepRecorder,
    leave_one_out,
    pearson,
    random_removals,
    spearman,
    subset_retraining,
)
from lightning_influence.models import Classifier  # noqa: E402

# optimizer label -> (Classifier optimizer, learning rate before --lr-scale, options)
OPTIMIZERS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "sgd": ("sgd", 0.1, {}),
    "momentum": ("sgd", 0.05, {"momentum": 0.9}),
}


def mlp(batch_norm: dict[str, Any] | None) -> nn.Module:
    """Linear 64-32, tanh, Linear 32-10; with ``batch_norm`` (BatchNorm1d's options) a BatchNorm1d
    after the first layer, which then has no bias (the normalisation cancels it)."""
    if batch_norm is None:
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, **batch_norm), nn.Tanh(), nn.Linear(32, 10))


def bn_cnn(activation: Callable[[], nn.Module] = nn.Tanh) -> nn.Module:
    """Conv 3x3 (8 channels), BatchNorm2d, activation, conv 3x3 stride 2 (16), BatchNorm2d, activation,
    Linear 256-10; the convolutions without bias."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        activation(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        activation(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bn-mlp": lambda: mlp({}),
    "bn-cnn": bn_cnn,
    "bn-cnn-relu": lambda: bn_cnn(nn.ReLU),
    "mlp-nobn": lambda: mlp(None),
    "bn-mlp-cumulative": lambda: mlp({"momentum": None}),
    "bn-mlp-no-running-stats": lambda: mlp({"track_running_stats": False}),
}

DIFFIN_ROW = re.compile(
    r"diffin-(?P<mode>replay|online)(?:-window(?P<window>[1-9][0-9]*))?(?:-(?P<batch_norm>auto|batch|running))?"
    r"(?:-(?P<removal>linear|exact))?"
)


def estimator_spec(label: str) -> tuple[str, dict[str, Any]]:
    """Registry name and options of the row ``label``: a label of ``fidelity.ESTIMATORS``, or a DiffIn row
    ``diffin-{replay,online}[-window<k>][-{auto,batch,running}][-{linear,exact}]``. Raises ``ValueError`` for any other."""
    if label in ESTIMATORS:
        return ESTIMATORS[label]
    match = DIFFIN_ROW.fullmatch(label)
    if match is None or (match["mode"] == "replay" and match["window"]):
        raise ValueError(
            f"unknown row {label!r}: use a label of fidelity.py ({', '.join(ESTIMATORS)}) or "
            "diffin-replay[-auto|-batch|-running][-linear|-exact], "
            "diffin-online[-window<k>][-auto|-batch|-running][-linear|-exact] (a window is online only)"
        )
    options: dict[str, Any] = {"target": "val", "mode": match["mode"]}
    if match["window"]:
        options.update(window=int(match["window"]), score_every=int(match["window"]))
    if match["batch_norm"]:
        options["batch_norm"] = match["batch_norm"]
    if match["removal"]:
        options["batch_norm_removal"] = match["removal"]
    return "diffin", options


class Normed(Classifier):
    """:class:`Classifier` (its per-sample cross-entropy, steps and optimizers) around the network ``body``."""

    def __init__(self, body: nn.Module, optimizer: str, lr: float, options: dict[str, Any]) -> None:
        with warnings.catch_warnings():  # Classifier saves its callers' arguments as hyperparameters: body among them
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            super().__init__(hidden=(), lr=lr, optimizer=optimizer, optimizer_options=options)
        self.net = body


def fit(
    model_name: str, optimizer: str, lr_scale: float, problem: Problem, callbacks: list[Any]
) -> tuple[Normed, float]:
    """A fresh model (seed 0) trained on ``problem`` with ``callbacks``, and the seconds ``fit`` took."""
    torch.manual_seed(0)
    name, lr, options = OPTIMIZERS[optimizer]
    model = Normed(MODELS[model_name](), name, lr * lr_scale, options).double()
    start = time.perf_counter()
    quiet_trainer(callbacks=callbacks).fit(model, train_dataloaders=problem.train)
    return model, time.perf_counter() - start


def scores_of(
    label: str, model_name: str, optimizer: str, args: argparse.Namespace, problem: Problem, plain_seconds: float
) -> tuple[Any, float]:
    """The row ``label``'s scores on a fresh fit of the same run, and the seconds to them (the fit's
    extra time over ``plain_seconds`` when the estimator watches training, plus post-hoc scoring)."""
    name, options = estimator_spec(label)
    if name in ("diffin", "sgd_influence", "tracin"):  # estimators that watch training take their target when built
        options = {**options, "target_loader": problem.val}
    estimator = build(name, **options)
    callback = estimator.callback()
    model, seconds = fit(model_name, optimizer, args.lr_scale, problem, [callback] if callback is not None else [])
    recording = max(seconds - plain_seconds, 0.0) if callback is not None else 0.0
    start = time.perf_counter()
    scores = estimator.scores(model, one_epoch(problem), Target("val", problem.val))
    return scores, recording + time.perf_counter() - start


def fidelity_rows(model_name: str, optimizer: str, labels: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    problem = make_problem(args.n, args.epochs, 0.0, batch_size=args.batch_size)
    recorder = StepRecorder()  # checks at the end of fit that retraining reproduces parameters and running statistics
    model, _ = fit(model_name, optimizer, args.lr_scale, problem, [recorder])
    _, plain_seconds = fit(model_name, optimizer, args.lr_scale, problem, [])
    start = time.perf_counter()
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[: args.samples]
    truth: Tensor = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    run = f"{model_name}/{optimizer}"
    print(
        f"[{run}] {len(recorder.steps)} steps; plain fit {plain_seconds:.2f}s; leave-one-out of {args.samples} samples in "
        f"{time.perf_counter() - start:.0f}s; |truth| max {float(truth.abs().max()):.3g}",
        flush=True,
    )
    rows = []
    for label in labels:
        row: dict[str, Any] = {"model": model_name, "optimizer": optimizer, "estimator": label}
        try:
            scores, seconds = scores_of(label, model_name, optimizer, args, problem, plain_seconds)
            est = column(scores, ids)
            row.update(
                spearman=spearman(est, truth),
                pearson=pearson(est, truth),
                batch_norm=scores.metadata.get("batch_norm"),
                removal=scores.metadata.get("batch_norm_removal"),
                max_adjoint_growth=scores.metadata.get("max_adjoint_growth"),
                seconds=seconds,
            )
        except Exception as err:  # a failing estimator is a row with its error, not a crash
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        print(f"[{run}] {label}: {row}", flush=True)
        rows.append(row)
    return rows


def speed_row(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    problem = make_problem(args.n, args.epochs, 0.0, batch_size=args.batch_size)
    recorder = StepRecorder(verify=False)
    model, _ = fit(model_name, "momentum", args.lr_scale, problem, [recorder])
    spec = (model, recorder.initial_params, recorder.steps, recorder.optimizer)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[: args.samples]
    removals = random_removals(range(problem.n), args.subsets, keep_fraction=0.5, seed=2)
    row: dict[str, Any] = {"model": model_name, "steps": len(recorder.steps)}
    for key, run in (("leave_one_out", lambda: leave_one_out(*spec, ids, problem.val)),
                     ("subsets", lambda: subset_retraining(*spec, removals, problem.val))):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        row[key] = best
    print(f"[speed] {row}", flush=True)
    return row


PARTS = ("fidelity", "speed")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as argparse errors before any training, names and settings the runs cannot use."""
    for flag, given, known in (
        ("--parts", args.parts, PARTS),
        ("--models", args.models, MODELS),
        ("--speed-models", args.speed_models, MODELS),
        ("--optimizers", args.optimizers, OPTIMIZERS),
    ):
        unknown = [g for g in given if g not in known]
        if unknown or not given:
            parser.error(f"{flag}: unknown or empty {unknown or given}; choose from {', '.join(known)}")
    for label in args.only:
        try:
            estimator_spec(label)
        except ValueError as err:
            parser.error(f"--only: {err}")
    if not 2 <= args.n <= MAX_TRAINING_SAMPLES:
        parser.error(
            f"--n must be between 2 and {MAX_TRAINING_SAMPLES} (digits' samples less the 300 target ones), got {args.n}"
        )
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 3 or 0 < args.n % args.batch_size < 3:
        parser.error(
            "batch norm needs at least 2 samples left in every batch after a removal: --batch-size >= 3 and "
            f"--n % --batch-size either 0 or >= 3, got --batch-size {args.batch_size}, --n {args.n}"
        )
    if not 3 <= args.samples <= args.n:
        parser.error(
            f"--samples (leave-one-out retrainings) must be between 3 (for a rank correlation) and --n={args.n}, "
            f"got {args.samples}"
        )
    if args.subsets < 3:
        parser.error(f"--subsets must be at least 3 (random_removals' minimum), got {args.subsets}")
    if not args.lr_scale > 0:
        parser.error(f"--lr-scale must be positive, got {args.lr_scale}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")


def print_tables(
    fidelity: list[dict[str, Any]], speed: list[dict[str, Any]], args: argparse.Namespace, seconds: float
) -> None:
    lrs = {name: lr * args.lr_scale for name, (_, lr, _) in OPTIMIZERS.items()}
    revision = git_revision(str(Path(__file__).resolve().parents[1]), "lightning_influence")
    print(
        f"\nlightning_influence {revision}, torch {torch.__version__}; digits float64, batch {args.batch_size}, "
        f"{args.n} samples, {args.epochs} epochs; sgd lr {lrs['sgd']:g}, momentum (0.9) lr {lrs['momentum']:g}; "
        f"LOO on {args.samples} samples, {args.subsets} half-subsets; {seconds:.0f}s in all.\n"
    )
    if fidelity:
        print(
            "| model | optimizer | estimator | batch_norm | LOO Spearman | LOO Pearson | max adjoint growth "
            "| seconds to scores |"
        )
        print("|---|---|---|---|---:|---:|---:|---:|")
        for r in fidelity:
            if "error" in r:
                print(f"| {r['model']} | {r['optimizer']} | {r['estimator']} | n/a: {r['error']} | | | | |")
            else:
                growth = "-" if r["max_adjoint_growth"] is None else f"{r['max_adjoint_growth']:.3g}"
                print(
                    f"| {r['model']} | {r['optimizer']} | {r['estimator']} | {r['batch_norm'] or '-'}"
                    f"{' (' + r['removal'] + ')' if r.get('removal') else ''} "
                    f"| {fmt(r['spearman'])} | {fmt(r['pearson'])} | {growth} | {fmt(r['seconds'], 1)} |"
                )
        print()
    if speed:
        print(
            f"| model (momentum) | steps | leave_one_out of {args.samples} (s) "
            f"| subset_retraining of {args.subsets} (s) |"
        )
        print("|---|---:|---:|---:|")
        for r in speed:
            print(f"| {r['model']} | {r['steps']} | {r['leave_one_out']:.2f} | {r['subsets']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="fidelity,speed", help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument(
        "--models", default="bn-mlp,bn-cnn", help=f"fidelity part, comma-separated: {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--optimizers", default="sgd,momentum", help=f"fidelity part, comma-separated: {', '.join(OPTIMIZERS)}"
    )
    parser.add_argument("--only", default="diffin-replay,diffin-online,diffin-replay-running,tracin",
                        help="fidelity part, comma-separated estimator rows (see above)")
    parser.add_argument("--speed-models", default="mlp-nobn,bn-mlp,bn-mlp-cumulative,bn-mlp-no-running-stats",
                        help="speed part, comma-separated models")
    parser.add_argument("--n", type=int, default=512, help="training samples")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies both optimizers' learning rates")
    parser.add_argument("--samples", type=int, default=100, help="leave-one-out retrainings per run")
    parser.add_argument("--subsets", type=int, default=20, help="speed part: half-subsets retrained")
    parser.add_argument("--repeats", type=int, default=1, help="speed part: timings per measurement (fastest shown)")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    for key in ("parts", "models", "optimizers", "only", "speed_models"):
        setattr(args, key, [s for s in getattr(args, key).split(",") if s])
    check_arguments(parser, args)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners; estimators' warnings stay
    warnings.filterwarnings("ignore", message=".*(LeafSpec|no `val_dataloader`)")
    start = time.perf_counter()
    fidelity: list[dict[str, Any]] = []
    if "fidelity" in args.parts:
        fidelity = [row for m in args.models for o in args.optimizers for row in fidelity_rows(m, o, args.only, args)]
    speed = [speed_row(m, args) for m in args.speed_models] if "speed" in args.parts else []
    print_tables(fidelity, speed, args, time.perf_counter() - start)
    if args.json:
        args.json.write_text(json.dumps({"fidelity": fidelity, "speed": speed}, indent=2))


if __name__ == "__main__":
    main()
