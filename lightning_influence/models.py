"""Embedded default models: influence-aware classifiers for the digits data (an MLP /
logistic regression, :class:`Classifier`, and a small CNN for the 8x8 images, :class:`SmallCNN`)."""

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

    def per_sample_outputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(logits[B, C], labels[B])`` of a batch (class scores for EL2N and forgetting)."""
        return self(batch[0]), batch[1]

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


class SmallCNN(Classifier):
    """A small convolutional network for square single-channel images (the 8x8 digits).

    Inputs may be flat ``[B, side * side]`` (as :class:`~lightning_influence.data.DigitsDataModule`
    yields them) or ``[B, 1, side, side]``. Layers: conv 3x3 (``channels[0]``, padding 1),
    activation, conv 3x3 stride 2 (``channels[1]``, padding 1), activation, linear to
    ``num_classes``. No dropout or batch norm, so training is deterministic and exactly
    retrainable. Optimizer, schedule, steps and logging: as :class:`Classifier`.
    """

    def __init__(
        self,
        side: int = 8,
        num_classes: int = 10,
        channels: Sequence[int] = (8, 16),
        activation: str = "relu",
        lr: float = 0.05,
        optimizer: str = "sgd",
        optimizer_options: dict[str, Any] | None = None,
        schedule: str = "constant",
    ) -> None:
        if side < 2 or len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"SmallCNN needs side >= 2 and two positive channel counts, got side={side}, channels={list(channels)}")
        super().__init__(side * side, num_classes, (), activation, lr, optimizer, optimizer_options, schedule)
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        c1, c2 = int(channels[0]), int(channels[1])
        out_side = (side + 1) // 2
        self.side = side
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            acts[activation](),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            acts[activation](),
            nn.Flatten(),
            nn.Linear(c2 * out_side * out_side, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(-1, 1, self.side, self.side))
