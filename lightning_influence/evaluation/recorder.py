"""Record what a Trainer run did, so that it can be retrained exactly without chosen samples."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_influence.evaluation.retraining import SGDStep, optimizer_lrs, sgd_param_groups


class StepRecorder(Callback):
    """Records the initial parameters, and each optimizer step's batch and learning rates.

    After ``fit``: :attr:`initial_params`, :attr:`steps` (``SGDStep`` list, the batches exactly as
    ``training_step`` saw them) and :attr:`param_groups`, ready for
    :func:`~lightning_influence.evaluation.leave_one_out`. Memory: every batch of the run.
    """

    def __init__(self) -> None:
        self.initial_params: dict[str, Tensor] = {}
        self.steps: list[SGDStep] = []
        self.param_groups: list[list[str]] = []
        self._batch: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.param_groups = sgd_param_groups(pl_module, trainer.optimizers[0])
        self.steps = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._batch is not None:
            self.steps.append(SGDStep(self._batch, optimizer_lrs(optimizer)))
            self._batch = None
