"""Embedded default models: influence-aware classifiers for the digits data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_influence.mixin import InfluenceMixin


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


class Classifier(InfluenceMixin, L.LightningModule):
    """A multilayer perceptron (``hidden=()`` gives logistic regression).

    Batches are ``(x, y, index)`` tuples as produced by :class:`~lightning_influence.data.IndexedDataset`.

    ``optimizer``: ``"sgd"``, ``"adam"`` or ``"adamw"`` with ``optimizer_options`` passed to it
    (``momentum``, ``nesterov``, ``weight_decay``, ``betas``, ...). ``schedule``: ``"constant"``,
    ``"cosine"`` (per step, to zero at the last step), ``"warmup_cosine"`` (linear warm-up over the
    first 10% of steps, then cosine) or ``"step"`` (per epoch, halving every epoch).
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: Sequence[int] = (32,),
        activation: str = "tanh",
        lr: float = 0.1,
        optimizer: str = "sgd",
        optimizer_options: dict[str, Any] | None = None,
        schedule: str = "constant",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), acts[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.lr = lr
        self.optimizer_name = optimizer
        self.optimizer_options = dict(optimizer_options or {})
        self.schedule = schedule

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = OPTIMIZERS[self.optimizer_name](self.parameters(), lr=self.lr, **self.optimizer_options)
        if self.schedule == "constant":
            return optimizer
        if self.schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(total // 10, 1) if self.schedule == "warmup_cosine" else 0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
