"""Where DiffIn's linearisation and DataInf's closed form lose accuracy, against leave-one-out.

Four measurements, each against leave-one-out retraining on digits (float64, fixed batch lists,
trained with a real Trainer), in one run; ``--parts`` chooses among them:

- ``adam-lr``: DiffIn replay on an MLP 64-16-10 (tanh; 256 samples, batch 16, 3 and 9 epochs =
  48 and 144 steps, ``--adam-epochs``) trained with AdamW at several learning rates (one group,
  weight decay 1e-2) and with two parameter groups (first layer lr 0.05, weight decay 1e-2; second
  layer lr 0.2, no decay). Spearman, Pearson and |scores| / |LOO| against
  ``evaluation.leave_one_out`` (64 samples), and ``scores.metadata["max_adjoint_growth"]``
  (DiffIn's instability alarm is at 1000).
- ``singleton``: the same MLP on 257 samples in batches of 16 with ``drop_last=False``: the last
  batch of each of the 3 epochs holds one sample (51 steps, 3 singleton steps). Spearman over 68
  samples (every 4th id and the singleton samples), without the singleton samples, and score / LOO
  of each singleton sample, for SGD lr 0.1 / 0.01 / 0.001 and Adam lr 1e-3 / 1e-4, with DiffIn's
  ``scores.metadata["singleton_steps"]``.
- ``spectral-norm``: the MLP 64-32-10 of ``lightning_influence.models.Classifier`` (SGD lr 0.1,
  256 samples, batch 32, 8 epochs = 64 steps) with spectral normalisation on its hidden layer
  (``torch.nn.utils.parametrizations.spectral_norm`` and the hook API ``nn.utils.spectral_norm``),
  3 seeds (``--seeds``). The library's retraining refuses spectral normalisation, so both ground
  truths are a plain-autograd loop here, one run per removed sample (64): the true leave-one-out
  (each run from the initial parameters and u/v vectors, with its own power iteration) and
  leave-one-out with the u/v vectors held at the values the recorded run trained with at each step
  (power iteration off: the function DiffIn linearises). A control without spectral
  normalisation checks the loop against ``evaluation.leave_one_out``.
- ``datainf``: |scores| / |LOO|, the least-squares factor LOO ~ scores, Spearman and Pearson of
  DataInf and the influence function (both built by name, ``estimators.build``): on a logistic
  regression trained to convergence (200 samples, L2 1e-2, L-BFGS; leave-one-out = retraining each
  of 60 removals to convergence), and after SGD (1024 samples, batch 32, lr 0.1, 256 steps;
  logistic regression and MLP 64-32-10; trajectory leave-one-out of 60 samples; the post-hoc
  estimators see one pass over the data).

Prints one Markdown table per part (two for ``singleton``); ``--json PATH`` writes every number.

    OMP_NUM_THREADS=1 python benchmarks/approximations.py              # all four parts, ~2 minutes on one core
    OMP_NUM_THREADS=1 python benchmarks/approximations.py --quick      # smoke run, ~15 s
    OMP_NUM_THREADS=1 python benchmarks/approximations.py --parts singleton,datainf --json approximations.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import digits_problem, quiet_trainer  # noqa: E402

from lightning_influence import DiffIn, InfluenceMixin  # noqa: E402
from lightning_influence.data import FixedBatches, load_digits_tensors  # noqa: E402
from lightning_influence.estimators import Target, build  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman  # noqa: E402
from lightning_influence.kernels import per_sample_loss_function  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402

PARTS = ("adam-lr", "singleton", "spectral-norm", "datainf")


# --------------------------------------------------------------------------- shared pieces


class Net(InfluenceMixin, L.LightningModule):
    """``net`` under cross-entropy; ``make_optimizer(net)`` builds the optimizer (parameter groups by layer)."""

    def __init__(self, net: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = make_optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.net)


def mlp16() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def fit_with_diffin(model: L.LightningModule, train: Any, target: Any) -> tuple[StepRecorder, DiffIn, list[str]]:
    """Fit with a StepRecorder and DiffIn (replay, ``target="val"``); the warnings DiffIn gave."""
    rec, cb = StepRecorder(), DiffIn(target="val", target_loader=target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[rec, cb]).fit(model, train_dataloaders=train)
    noise = ("num_workers", "does not have many workers", "GPU available", "TPU available", "HPU available")
    messages = sorted({str(w.message) for w in caught if not any(s in str(w.message) for s in noise)})
    return rec, cb, messages


def picked(scores: Any, ids: torch.Tensor) -> torch.Tensor:
    """``scores`` (an InfluenceScores, or a DiffIn callback's) at the sample ids ``ids``."""
    pos = {int(i): r for r, i in enumerate(scores.ids.tolist())}
    return scores.values[[pos[int(i)] for i in ids]].reshape(len(ids), -1)[:, 0].double()


def agreement(est: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return {
        "spearman": spearman(est, truth),
        "pearson": pearson(est, truth),
        "norm_ratio": float(est.norm() / truth.norm()),  # |scores| / |LOO|
        "ls_factor": float(est @ truth / (est @ est)),  # least squares LOO ~ factor * scores
    }


def _numeric(cell: Any) -> bool:
    try:
        float(str(cell).replace(",", ""))
        return True
    except ValueError:
        return str(cell) == "-"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; columns whose every cell is a number are right-aligned."""
    align = ["---:" if rows and all(_numeric(row[c]) for row in rows) else "---" for c in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(message: str, start: float) -> None:
    print(f"  {message} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- adam-lr


def adam_lr(quick: bool, start: float, epochs: list[int]) -> tuple[list[dict], str]:
    def groups(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [
                {"params": net[0].parameters(), "lr": 0.05, "weight_decay": 1e-2},
                {"params": net[2].parameters(), "lr": 0.2, "weight_decay": 0.0},
            ]
        )

    lrs = (5e-3,) if quick else (1e-3, 5e-3, 2e-2, 5e-2)
    cases: list[tuple[str, Callable[[nn.Module], torch.optim.Optimizer]]] = [
        (f"AdamW lr {lr:g}", lambda net, lr=lr: torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2))
        for lr in lrs
    ]
    cases.append(("AdamW, groups: lr 0.05 (wd 1e-2) / lr 0.2 (wd 0)", groups))
    ids = torch.arange(0, 256, 8 if quick else 4)
    rows = []
    for n_epochs in epochs:
        problem = digits_problem(n=256, batch_size=16, epochs=n_epochs, val_size=200)
        for label, make in cases:
            torch.manual_seed(0)
            model = Net(mlp16(), make).double()
            rec, cb, _ = fit_with_diffin(model, problem.train, problem.val)
            truth = leave_one_out(model, rec.initial_params, rec.steps, rec.optimizer, ids, problem.val)
            est = picked(cb.scores, ids)
            rows.append(
                {
                    "setup": label,
                    "steps": len(rec.steps),
                    "samples": len(ids),
                    **agreement(est, truth),
                    "max_adjoint_growth": cb.scores.metadata.get("max_adjoint_growth"),
                }
            )
            progress(f"adam-lr: {label}, {len(rec.steps)} steps", start)
    text = table(
        [
            "optimizer (MLP 64-16-10, float64)",
            "steps",
            "samples",
            "Spearman",
            "Pearson",
            "abs(scores) / abs(LOO)",
            "max_adjoint_growth",
        ],
        [
            [
                r["setup"],
                r["steps"],
                r["samples"],
                f"{r['spearman']:.3f}",
                f"{r['pearson']:.3f}",
                f"{r['norm_ratio']:.2f}",
                _num(r["max_adjoint_growth"]),
            ]
            for r in rows
        ],
    )
    return rows, text


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


# --------------------------------------------------------------------------- singleton


def singleton(quick: bool, start: float) -> tuple[list[dict], str]:
    # 257 samples in batches of 16: the 17th batch of every epoch holds one sample
    problem = digits_problem(n=257, batch_size=16, epochs=3, val_size=200)
    singles = [int(b[2][0]) for b in problem.train.batches if len(b[2]) == 1]
    ids = torch.tensor(sorted(set(range(0, 257, 8 if quick else 4)) | set(singles)))
    is_single = torch.tensor([int(i) in singles for i in ids])
    cases = (
        [("SGD", 0.1), ("Adam", 1e-4)]
        if quick
        else [("SGD", 0.1), ("SGD", 0.01), ("SGD", 0.001), ("Adam", 1e-3), ("Adam", 1e-4)]
    )
    rows = []
    for name, lr in cases:
        cls = torch.optim.SGD if name == "SGD" else torch.optim.Adam
        torch.manual_seed(0)
        model = Net(mlp16(), lambda net, cls=cls, lr=lr: cls(net.parameters(), lr=lr)).double()
        rec, cb, messages = fit_with_diffin(model, problem.train, problem.val)
        truth = leave_one_out(model, rec.initial_params, rec.steps, rec.optimizer, ids, problem.val)
        est = picked(cb.scores, ids)
        rows.append(
            {
                "optimizer": name,
                "lr": lr,
                "steps": len(rec.steps),
                "samples": len(ids),
                "singleton_steps": cb.scores.metadata.get("singleton_steps"),
                "warned": any("single sample" in m for m in messages),
                "spearman": spearman(est, truth),
                "spearman_without_singletons": spearman(est[~is_single], truth[~is_single]),
                "median_abs_loo": float(truth.abs().median()),
                "singletons": [
                    {
                        "id": int(ids[k]),
                        "score": float(est[k]),
                        "loo": float(truth[k]),
                        "ratio": float(est[k] / truth[k]),
                    }
                    for k in torch.nonzero(is_single).flatten().tolist()
                ],
            }
        )
        progress(f"singleton: {name} lr {lr:g}", start)
    summary = table(
        [
            "optimizer",
            "lr",
            "steps",
            "metadata singleton_steps",
            "warned",
            "Spearman (all)",
            "Spearman (without singleton samples)",
            "score / LOO of the singleton samples",
        ],
        [
            [
                r["optimizer"],
                f"{r['lr']:g}",
                r["steps"],
                r["singleton_steps"],
                "yes" if r["warned"] else "no",
                f"{r['spearman']:.3f}",
                f"{r['spearman_without_singletons']:.3f}",
                ", ".join(f"{s['ratio']:.2f}" for s in r["singletons"]),
            ]
            for r in rows
        ],
    )
    detail = table(
        [
            "optimizer",
            "lr",
            "singleton sample id",
            "DiffIn score",
            "LOO",
            "score / LOO",
            "median abs(LOO), all scored samples",
        ],
        [
            [
                r["optimizer"],
                f"{r['lr']:g}",
                s["id"],
                f"{s['score']:.3e}",
                f"{s['loo']:.3e}",
                f"{s['ratio']:.2f}",
                f"{r['median_abs_loo']:.3e}",
            ]
            for r in rows
            for s in r["singletons"]
        ],
    )
    return rows, summary + "\n\n" + detail


# --------------------------------------------------------------------------- spectral-norm


class SpectralClassifier(Classifier):
    """Classifier MLP 64-32-10 with spectral normalisation on its hidden layer (``api``:
    ``"parametrization"``, ``"hook"``, or ``None`` for none)."""

    def __init__(self, api: str | None) -> None:
        super().__init__(hidden=(32,), lr=0.1)
        if api == "parametrization":
            self.net[0] = nn.utils.parametrizations.spectral_norm(self.net[0])
        elif api == "hook":
            self.net[0] = nn.utils.spectral_norm(self.net[0])


def _power_iteration_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``training`` flag switches spectral normalisation's power iteration."""
    from torch.nn.utils.parametrizations import _SpectralNorm
    from torch.nn.utils.spectral_norm import SpectralNorm

    return [
        m
        for m in model.modules()
        if isinstance(m, _SpectralNorm) or any(isinstance(h, SpectralNorm) for h in m._forward_pre_hooks.values())
    ]


def plain_loop(
    make: Callable[[], nn.Module], start_state: dict, rec: StepRecorder, removed: int, hold: bool
) -> nn.Module:
    """The recorded SGD run re-run with plain autograd without sample ``removed`` (-1: none), on a
    fresh ``make()`` loaded with ``start_state`` (parameters and buffers). ``hold``: each step
    evaluates with the buffers the recorded run trained with (``TrainingStep.varying``), the power
    iteration off; otherwise each run advances its own power iteration."""
    m = make()  # not a deepcopy of the trained module: the hook API leaves a non-leaf `weight` on it
    m.load_state_dict(start_state)
    m.train()
    buffers = dict(m.named_buffers())
    if hold:
        for sub in _power_iteration_modules(m):
            sub.training = False
    opt = torch.optim.SGD(m.parameters(), lr=rec.steps[0].lrs[0])
    for step in rec.steps:
        if hold:
            with torch.no_grad():
                for name, value in step.varying.items():
                    buffers[name].copy_(value)
        opt.zero_grad(set_to_none=True)
        for x, y, idx in step.batches:
            keep = idx != removed
            if bool(keep.any()):
                (m.per_sample_loss((x[keep], y[keep], idx[keep])).mean() / step.normalizer).backward()
        for group, lr in zip(opt.param_groups, step.lrs, strict=True):
            group["lr"] = lr
        opt.step()
    return m


def plain_loo(
    make: Callable[[], nn.Module],
    model: nn.Module,
    start_state: dict,
    rec: StepRecorder,
    ids: torch.Tensor,
    val: Any,
    hold: bool,
) -> tuple[torch.Tensor, float]:
    """Leave-one-out by :func:`plain_loop`, and how far its run without removal ends from the
    recorded final parameters."""

    def target(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(torch.cat([m.per_sample_loss(b) for b in val]).mean())

    base = plain_loop(make, start_state, rec, -1, hold)
    final = dict(model.named_parameters())
    miss = max(float((p - final[n]).abs().max()) for n, p in base.named_parameters())
    f0 = target(base)
    return torch.tensor(
        [target(plain_loop(make, start_state, rec, int(i), hold)) - f0 for i in ids], dtype=torch.float64
    ), miss


def spectral_norm(quick: bool, start: float, seeds: int) -> tuple[list[dict], str]:
    problem = digits_problem(n=256, batch_size=32, epochs=8)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[: 16 if quick else 64]
    cases = [(None, 0)] + [
        (api, s)
        for api in (("parametrization",) if quick else ("parametrization", "hook"))
        for s in range(1 if quick else seeds)
    ]
    rows = []
    for api, seed in cases:

        def make(api: str | None = api) -> nn.Module:
            return SpectralClassifier(api).double()

        torch.manual_seed(seed)
        model = make()
        start_state = copy.deepcopy(model.state_dict())  # parameters and the power iteration's u/v
        rec, cb, messages = fit_with_diffin(model, problem.train, problem.val)
        est = picked(cb.scores, ids)
        true_loo, miss_true = plain_loo(make, model, start_state, rec, ids, problem.val, hold=False)
        row: dict[str, Any] = {
            "api": api or "none (control)",
            "seed": seed,
            "steps": len(rec.steps),
            "samples": len(ids),
            "diffin_vs_true_loo": agreement(est, true_loo),
            "true_loop_miss": miss_true,
            "diffin_warned": any("spectral" in m.lower() for m in messages),
        }
        if api is None:  # the control: the plain loop against the library's retraining
            engine = leave_one_out(model, rec.initial_params, rec.steps, rec.optimizer, ids, problem.val)
            row["loop_vs_engine_max_abs"] = float((true_loo - engine).abs().max())
            row["mean_abs_loo"] = float(engine.abs().mean())
        else:
            held_loo, miss_held = plain_loo(make, model, start_state, rec, ids, problem.val, hold=True)
            row["diffin_vs_held_loo"] = agreement(est, held_loo)
            row["held_vs_true_loo"] = agreement(held_loo, true_loo)
            row["held_loop_miss"] = miss_held
            params = dict(model.named_parameters())
            weight = params[
                "net.0.parametrizations.weight.original" if api == "parametrization" else "net.0.weight_orig"
            ]
            sv = torch.linalg.svdvals(weight.detach())
            row["singular_values"] = sv[:4].tolist()
            row["singular_gap"] = float(sv[1] / sv[0])
        rows.append(row)
        progress(f"spectral-norm: {row['api']} seed {seed}", start)

    control = next(r for r in rows if "loop_vs_engine_max_abs" in r)
    text = table(
        [
            "spectral_norm API",
            "seed",
            "DiffIn vs true LOO: Spearman (Pearson)",
            "DiffIn vs LOO with u/v held: Spearman (Pearson)",
            "held vs true LOO: Spearman",
            "sigma_2 / sigma_1 of the trained weight",
            "DiffIn warned",
            "plain loop, nothing removed, vs the recorded final parameters: max diff (true / held)",
        ],
        [
            [
                r["api"],
                r["seed"],
                f"{r['diffin_vs_true_loo']['spearman']:.3f} ({r['diffin_vs_true_loo']['pearson']:.3f})",
                f"{r['diffin_vs_held_loo']['spearman']:.3f} ({r['diffin_vs_held_loo']['pearson']:.3f})",
                f"{r['held_vs_true_loo']['spearman']:.3f}",
                f"{r['singular_gap']:.3f}",
                "yes" if r["diffin_warned"] else "no",
                f"{r['true_loop_miss']:.1e} / {r['held_loop_miss']:.1e}",
            ]
            for r in rows
            if r is not control
        ],
    )
    c = control["diffin_vs_true_loo"]
    text += (
        f"\n\nControl, the same MLP without spectral normalisation (seed {control['seed']}): the plain loop's "
        f"leave-one-out differs from `evaluation.leave_one_out` by at most {control['loop_vs_engine_max_abs']:.1e} "
        f"(mean abs(LOO) {control['mean_abs_loo']:.1e}); DiffIn against it: Spearman {c['spearman']:.3f} "
        f"(Pearson {c['pearson']:.3f}); the loop without removal ends {control['true_loop_miss']:.1e} from the "
        "recorded final parameters."
    )
    return rows, text


# --------------------------------------------------------------------------- datainf


def _converged_logreg(k: int) -> tuple[list[tuple[str, dict]], float]:
    """Logistic regression on 64-pixel digits (200 samples, L2 1e-2) fitted by L-BFGS; leave-one-out
    of ``k`` samples by refitting each removal to convergence (vmapped L-BFGS from the fit)."""
    n, l2 = 200, 1e-2
    x, y = load_digits_tensors(torch.float64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    X, Y, Xv, Yv = x[:n], y[:n], x[n : n + 200], y[n : n + 200]
    torch.manual_seed(0)
    module = Classifier(64, 10, hidden=()).double()
    opt = torch.optim.LBFGS(
        module.parameters(),
        max_iter=200,
        tolerance_grad=1e-10,
        tolerance_change=0,
        history_size=30,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = module.per_sample_loss((X, Y)).mean() + 0.5 * l2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    module.eval()
    loss_fn = per_sample_loss_function(module)
    removed = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k]
    weights = torch.ones(k, n, dtype=torch.float64)
    weights[torch.arange(k), removed] = 0
    stacked = {
        name: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()).requires_grad_(True)
        for name, p in module.named_parameters()
    }
    lbfgs = torch.optim.LBFGS(
        list(stacked.values()),
        max_iter=1000,
        tolerance_grad=1e-11,
        tolerance_change=0,
        history_size=30,
        line_search_fn="strong_wolfe",
    )

    def objective(p: dict, w: torch.Tensor) -> torch.Tensor:
        return (loss_fn(p, (X, Y)) * w).sum() / w.sum() + 0.5 * l2 * sum((t**2).sum() for t in p.values())

    def joint() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = torch.func.vmap(objective)(stacked, weights).sum()
        loss.backward()
        return loss

    lbfgs.step(joint)

    def val_loss(p: dict) -> torch.Tensor:
        return loss_fn(p, (Xv, Yv)).mean()

    with torch.no_grad():
        truth = torch.func.vmap(val_loss)({k_: v.detach() for k_, v in stacked.items()}) - val_loss(
            dict(module.named_parameters())
        )
    train = FixedBatches([(X[i : i + 100], Y[i : i + 100], torch.arange(i, i + 100)) for i in range(0, n, 100)])
    target = Target("val", FixedBatches([(Xv, Yv, torch.arange(200))]))
    estimators = [
        (
            "influence function, exact Hessian, damping = L2 1e-2",
            build("influence_function", solver="exact", curvature="hessian", damping=l2, damping_scale="absolute"),
        ),
        ("DataInf (defaults: damping 0.1 x mean eigenvalue)", build("datainf")),
        ("DataInf, damping = L2 1e-2 (absolute)", build("datainf", damping=l2, damping_scale="absolute")),
    ]
    rows = []
    for label, estimator in estimators:
        est = picked(estimator.scores(module, train, target), removed)
        rows.append((label, agreement(est, truth)))
    return rows, float(truth.norm() / k**0.5)


def _after_sgd(hidden: tuple[int, ...], k: int, quick: bool) -> tuple[list[tuple[str, dict]], float]:
    problem = digits_problem(n=1024, batch_size=32, epochs=8, val_size=300)
    torch.manual_seed(0)
    model = Classifier(hidden=hidden, lr=0.1).double()
    rec = StepRecorder()
    quiet_trainer(callbacks=[rec]).fit(model, train_dataloaders=problem.train)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:k]
    truth = leave_one_out(model, rec.initial_params, rec.steps, rec.optimizer, ids, problem.val)
    one_pass = FixedBatches(problem.train.batches[: problem.n // 32])
    target = Target("val", problem.val)
    estimators = [("influence function, exact Gauss-Newton (defaults)", build("influence_function", solver="exact"))]
    if not quick:
        estimators.append(("influence function, EK-FAC (defaults)", build("influence_function", solver="ekfac")))
    estimators.append(("DataInf (defaults: damping 0.1 x mean eigenvalue)", build("datainf")))
    rows = []
    for label, estimator in estimators:
        est = picked(estimator.scores(model, one_pass, target), ids)
        rows.append((label, agreement(est, truth)))
    return rows, float(truth.norm() / k**0.5)


def datainf(quick: bool, start: float) -> tuple[list[dict], str]:
    k = 20 if quick else 60
    settings: list[tuple[str, Callable[[], tuple[list[tuple[str, dict]], float]]]] = [
        ("logreg, L-BFGS to convergence (200 samples, L2 1e-2)", lambda: _converged_logreg(k)),
        ("logreg, SGD 256 steps", lambda: _after_sgd((), k, quick)),
    ]
    if not quick:
        settings.append(("MLP 64-32-10, SGD 256 steps", lambda: _after_sgd((32,), k, quick)))
    rows = []
    for setting, run in settings:
        results, rms = run()
        rows += [{"setting": setting, "estimator": label, "samples": k, "rms_loo": rms, **r} for label, r in results]
        progress(f"datainf: {setting}", start)
    text = table(
        [
            "training",
            "estimator",
            "abs(scores) / abs(LOO)",
            "LOO ~ factor x scores (least squares)",
            "Spearman",
            "Pearson",
        ],
        [
            [
                r["setting"],
                r["estimator"],
                f"{r['norm_ratio']:.3g}",
                f"{r['ls_factor']:.3g}",
                f"{r['spearman']:.3f}",
                f"{r['pearson']:.3f}",
            ]
            for r in rows
        ],
    )
    return rows, text


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, among {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="fewer setups and samples: a smoke run under a minute")
    parser.add_argument(
        "--adam-epochs",
        type=int,
        nargs="+",
        default=[3, 9],
        help="adam-lr: epochs of 16 steps (default 3 9: 48 and 144 steps)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="spectral-norm: model seeds per API (default 3)")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"unknown parts {unknown}; choose among {','.join(PARTS)}")
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    titles = {
        "adam-lr": "DiffIn replay with AdamW, by learning rate",
        "singleton": "DiffIn replay with a one-sample batch at the end of every epoch (drop_last=False)",
        "spectral-norm": "DiffIn replay with spectral normalisation, against two plain-loop leave-one-outs",
        "datainf": "DataInf and the influence function against leave-one-out retraining",
    }
    results: dict[str, Any] = {}
    outputs = []
    for part in parts:
        t0 = time.perf_counter()
        if part == "adam-lr":
            rows, text = adam_lr(args.quick, start, [3] if args.quick else args.adam_epochs)
        elif part == "singleton":
            rows, text = singleton(args.quick, start)
        elif part == "spectral-norm":
            rows, text = spectral_norm(args.quick, start, args.seeds)
        else:
            rows, text = datainf(args.quick, start)
        seconds = time.perf_counter() - t0
        results[part] = {"rows": rows, "seconds": seconds}
        outputs.append(f"### `{part}`: {titles[part]} ({seconds:.0f}s)\n\n{text}\n")
        print(outputs[-1], flush=True)
    total = time.perf_counter() - start
    quick = "quick run; " if args.quick else ""
    print(f"{quick}torch {torch.__version__}, lightning {L.__version__}; {total:.0f}s in all.")
    if args.json:
        results["total_seconds"] = total
        results["quick"] = args.quick
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
