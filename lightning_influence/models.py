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
from torchmetrics import Metric

from lightning_influence.mixin import InfluenceMixin


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
}
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")


class SampleMean(Metric):
    """The mean of a per-sample value over an evaluation set, each sample counted once, also
    across the processes of a distributed run.

    Under DDP, Lightning reads an evaluation loader through a ``DistributedSampler`` that pads the
    shards to equal length with repeated samples, and a value logged without synchronisation is
    rank zero's shard only. Here every process keeps its samples' values with their sample ids
    (``dist_reduce_fx="cat"``: torchmetrics gathers the ranks' states, of unequal lengths too, at
    ``compute``), and ``compute`` averages over the distinct ids: exactly the one-process value on
    the whole set (up to float summation order), whatever the world size and padding. Values given
    without ids (batches without a sample-id column) are summed and counted as they come, reduced
    by sum across ranks: exact except that a padded, repeated sample counts again.

    ``across_processes`` (set by :class:`Classifier` from its Trainer's world size at every step):
    whether ``compute`` gathers the other processes' states. A one-device Trainer run in one
    process of a distributed job (e.g. a trial fit) must not wait for the other processes.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.across_processes = True
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("unindexed_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unindexed_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor, ids: Tensor | None = None) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        if ids is None:
            self.unindexed_sum += values.sum()
            self.unindexed_count += values.numel()
            return
        ids = torch.as_tensor(ids, device=values.device).reshape(-1).long()
        if ids.numel() != values.numel():
            raise ValueError(f"SampleMean got {values.numel()} values for {ids.numel()} sample ids")
        self.ids.append(ids)
        self.values.append(values)

    def sync(self, dist_sync_fn: Any = None, process_group: Any = None, should_sync: bool = True, distributed_available: Any = None) -> None:
        super().sync(dist_sync_fn, process_group, should_sync and self.across_processes, distributed_available)

    def compute(self) -> Tensor:
        total, count = self.unindexed_sum.clone(), self.unindexed_count.clone()
        ids, values = self.ids, self.values
        # After the distributed sync a "cat" state is one tensor; before it (one process) a list.
        ids = torch.cat(ids) if isinstance(ids, list) and ids else ids
        values = torch.cat(values) if isinstance(values, list) and values else values
        if isinstance(ids, Tensor) and ids.numel():
            # One value per distinct id (a repeated id is the same sample under the same
            # parameters: a DistributedSampler's padding).
            unique, inverse = torch.unique(ids, return_inverse=True)
            first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
            first.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
            total = total + values[first].sum()
            count = count + unique.numel()
        return total / count if int(count) > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def _update(module: L.LightningModule, metric: SampleMean, values: Tensor, ids: Tensor | None) -> None:
    trainer = getattr(module, "_trainer", None)
    metric.across_processes = trainer is not None and int(getattr(trainer, "world_size", 1) or 1) > 1
    metric.update(values, ids)


def _sample_ids(batch: Any) -> Tensor | None:
    """The sample-id column of an ``(x, y, index)`` batch; ``None`` for ``(x, y)`` batches."""
    return batch[2] if isinstance(batch, (tuple, list)) and len(batch) >= 3 else None


class Classifier(InfluenceMixin, L.LightningModule):
    """A multilayer perceptron (``hidden=()`` gives logistic regression).

    Batches are ``(x, y, index)`` tuples as produced by :class:`~lightning_influence.data.IndexedDataset`.

    ``optimizer``: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"nadam"`` or ``"radam"`` with ``optimizer_options`` passed to it
    (``momentum``, ``nesterov``, ``weight_decay``, ``betas``, ...). ``schedule``: ``"constant"``,
    ``"cosine"`` (per step, to zero at the last step), ``"warmup_cosine"`` (linear warm-up over the
    first 10% of steps, then cosine) or ``"step"`` (per epoch, halving every epoch).

    Logs ``train_loss`` (per step, this process's batch) and ``val_loss``, ``val_acc``,
    ``test_acc``: means over the whole evaluation set, each sample once, in one process and across
    the processes of a distributed run alike (:class:`SampleMean`).
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
        # Evaluation metrics over the whole set, each sample once, also under DDP (see SampleMean).
        self.val_loss_metric = SampleMean()
        self.val_acc_metric = SampleMean()
        self.test_acc_metric = SampleMean()

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

    # val_loss, val_acc and test_acc are means over the samples of the whole evaluation set, each
    # sample counted once, in one process and across the processes of a distributed run alike
    # (SampleMean: exact where batches carry sample ids, as (x, y, index) batches do).
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, ids = batch[0], batch[1], _sample_ids(batch)
        logits = self(x)
        _update(self, self.val_loss_metric, F.cross_entropy(logits, y, reduction="none"), ids)
        _update(self, self.val_acc_metric, (logits.argmax(-1) == y).float(), ids)
        self.log("val_loss", self.val_loss_metric, on_step=False, on_epoch=True)
        self.log("val_acc", self.val_acc_metric, on_step=False, on_epoch=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y, ids = batch[0], batch[1], _sample_ids(batch)
        _update(self, self.test_acc_metric, (self(x).argmax(-1) == y).float(), ids)
        self.log("test_acc", self.test_acc_metric, on_step=False, on_epoch=True)

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
    ``num_classes``. No dropout, so training is deterministic and exactly retrainable; with
    ``batch_norm`` each convolution (then without bias) is followed by ``nn.BatchNorm2d`` (a
    ResNet-style block, scored as trained by ``DiffIn``'s default ``batch_norm="auto"``).
    Optimizer, schedule, steps and logging: as :class:`Classifier`.
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
        batch_norm: bool = False,
    ) -> None:
        if side < 2 or len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"SmallCNN needs side >= 2 and two positive channel counts, got side={side}, channels={list(channels)}")
        super().__init__(side * side, num_classes, (), activation, lr, optimizer, optimizer_options, schedule)
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        c1, c2 = int(channels[0]), int(channels[1])
        out_side = (side + 1) // 2
        self.side = side
        norm = (lambda c: [nn.BatchNorm2d(c)]) if batch_norm else (lambda c: [])
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=not batch_norm),
            *norm(c1),
            acts[activation](),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=not batch_norm),
            *norm(c2),
            acts[activation](),
            nn.Flatten(),
            nn.Linear(c2 * out_side * out_side, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(-1, 1, self.side, self.side))
