"""Training setups checked against leave-one-out retraining with the same optimizer: shared by
``tests/test_optimizer_fidelity.py`` (asserted bars) and ``benchmarks/optimizers.py`` (the
README table). Digits MLP 64-32-10 (tanh), float64, a fixed list of batches of 32."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from conftest import digits_problem, quiet_trainer
from lightning_influence import DiffIn
from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman
from lightning_influence.models import OPTIMIZERS, Classifier


@dataclass(frozen=True)
class Case:
    """One training setup: the model's optimizer and schedule, and Trainer options."""

    optimizer: str
    lr: float
    options: dict[str, Any] = field(default_factory=dict)
    schedule: str = "constant"
    trainer: dict[str, Any] = field(default_factory=dict)
    groups: bool = False  # two parameter groups (the output layer at 1/2 the learning rate) and a frozen bias


CASES: dict[str, Case] = {
    "sgd": Case("sgd", 0.1),
    "sgd-momentum": Case("sgd", 0.02, {"momentum": 0.9}),
    "sgd-nesterov-l2": Case("sgd", 0.02, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": Case("adam", 1e-3),
    "adam-l2": Case("adam", 1e-3, {"weight_decay": 1e-3}),
    "adamw": Case("adamw", 1e-3, {"weight_decay": 0.05}),
    "adamw-amsgrad-warmup-cosine": Case("adamw", 2e-3, {"weight_decay": 0.01, "amsgrad": True}, "warmup_cosine"),
    "sgd-momentum-step-lr-groups": Case("sgd", 0.04, {"momentum": 0.9}, "step", groups=True),
    "adam-clip-norm": Case("adam", 2e-3, trainer={"gradient_clip_val": 0.5}),
    "sgd-clip-value": Case("sgd", 0.1, trainer={"gradient_clip_val": 0.02, "gradient_clip_algorithm": "value"}),
    "adamw-accumulate-3": Case("adamw", 2e-3, {"weight_decay": 0.01}, trainer={"accumulate_grad_batches": 3}),
    "rmsprop": Case("rmsprop", 5e-4),
    "rmsprop-centered-momentum-l2": Case("rmsprop", 5e-5, {"momentum": 0.9, "centered": True, "weight_decay": 1e-3}),
    "adagrad-decay-l2": Case("adagrad", 0.02, {"lr_decay": 0.01, "weight_decay": 1e-3}),
    "nadam": Case("nadam", 1e-3),
    "radam-decoupled": Case("radam", 2e-3, {"weight_decay": 0.01, "decoupled_weight_decay": True}),
}


class _Grouped(Classifier):
    """Two parameter groups and a frozen parameter."""

    def configure_optimizers(self) -> Any:
        self.net[0].bias.requires_grad_(False)
        head = list(self.net[-1].parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        kind = OPTIMIZERS[self.optimizer_name]
        optimizer = kind([{"params": body}, {"params": head, "lr": self.lr / 2}], lr=self.lr, **self.optimizer_options)
        if self.schedule == "step":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)]
        return optimizer


def build_model(case: Case, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    kind = _Grouped if case.groups else Classifier
    return kind(hidden=(32,), lr=case.lr, optimizer=case.optimizer, optimizer_options=case.options, schedule=case.schedule).double()


def measure(
    case: Case, configs: dict[str, dict[str, Any]], *, epochs: int = 16, samples: int = 120, seed: int = 0
) -> dict[str, Any]:
    """Train once with one DiffIn per entry of ``configs`` (its keyword arguments), retrain without
    each of ``samples`` random samples, and return the correlations per config."""
    problem = digits_problem(n=1024, batch_size=32, epochs=epochs)
    callbacks = {}
    for name, kwargs in configs.items():
        callbacks[name] = DiffIn(target="val", target_loader=problem.val, name=name, **kwargs)
    model = build_model(case, seed)
    recorder = StepRecorder()
    start = time.perf_counter()
    quiet_trainer(callbacks=[recorder, *callbacks.values()], **case.trainer).fit(model, train_dataloaders=problem.train)
    fit_seconds = time.perf_counter() - start
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(seed + 1))[:samples]
    start = time.perf_counter()
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    truth_seconds = time.perf_counter() - start
    out: dict[str, Any] = {"steps": len(recorder.steps), "fit_seconds": fit_seconds, "retrain_seconds": truth_seconds}
    for name, cb in callbacks.items():
        est = torch.stack([cb.scores[int(i)] for i in ids])
        out[name] = {
            "spearman": spearman(est, truth),
            "pearson": pearson(est, truth),
            "truncated": cb.scores.metadata["steps_scored_truncated"],
            "seconds": cb.scores.metadata["callback_seconds"],
        }
    return out
