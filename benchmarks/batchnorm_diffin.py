"""DiffIn on batch-norm models: ``batch_norm="running"`` (evaluation mode, the default) against
``batch_norm="batch"`` (scored as trained), replay and online, Spearman / Pearson against the
library's leave-one-out retraining (each run with its own batch and running statistics).

Digits, float64, a fixed batch list, a small MLP (Linear -> BatchNorm1d -> tanh -> Linear) or conv
net (Conv2d -> BatchNorm2d -> tanh -> Linear -> BatchNorm1d -> tanh -> Linear), plain SGD or SGD
with momentum 0.9.

    OMP_NUM_THREADS=1 python benchmarks/batchnorm_diffin.py --model mlp --optimizer sgd
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_influence import DiffIn, InfluenceMixin
from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman


class Net(InfluenceMixin, L.LightningModule):
    def __init__(self, model: str, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        if model == "mlp-nobn":  # the reference without batch norm
            self.body = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        elif model == "mlp":
            self.body = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
        else:
            self.body = nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.Tanh(), nn.Flatten(),
                nn.Linear(6 * 36, 24, bias=False), nn.BatchNorm1d(24), nn.Tanh(), nn.Linear(24, 10),
            )

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self.body(x), y, reduction="none")

    def sample_ids(self, batch: Any) -> torch.Tensor:
        return batch[2]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "conv", "mlp-nobn"], default="mlp")
    parser.add_argument("--optimizer", choices=["sgd", "momentum"], default="sgd")
    parser.add_argument("--n", type=int, default=320, help="training samples")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ids", type=int, default=100, help="samples retrained without")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies the learning rate")
    parser.add_argument("--windows", type=int, nargs="*", default=[16], help="online windows besides the default (256)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    x, y = load_digits_tensors(torch.float64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    X, Y = x[perm[: args.n]], y[perm[: args.n]]
    batches = []
    for _ in range(args.epochs):
        order = torch.randperm(args.n, generator=g)
        batches += [(X[order[i : i + args.batch_size]], Y[order[i : i + args.batch_size]], order[i : i + args.batch_size])
                    for i in range(0, args.n - args.batch_size + 1, args.batch_size)]
    val = [(x[perm[args.n : args.n + 200]], y[perm[args.n : args.n + 200]], torch.arange(200))]
    lr, momentum = (0.1, 0.0) if args.optimizer == "sgd" else (0.05, 0.9)
    lr *= args.lr_scale

    torch.manual_seed(0)
    model = Net(args.model, lr, momentum).double()
    callbacks: dict[str, DiffIn] = {
        "running, replay": DiffIn(target="val", target_loader=val, name="running-replay"),
        "batch, replay": DiffIn(target="val", target_loader=val, batch_norm="batch", name="batch-replay"),
        "batch, online (window 256)": DiffIn(target="val", target_loader=val, batch_norm="batch", mode="online", name="batch-online"),
        "running, online (window 256)": DiffIn(target="val", target_loader=val, mode="online", name="running-online"),
    }
    if args.model == "mlp-nobn":
        callbacks = {k: v for k, v in callbacks.items() if k.startswith("running")}
    for w in args.windows if args.model != "mlp-nobn" else []:
        callbacks[f"batch, online (window {w})"] = DiffIn(
            target="val", target_loader=val, batch_norm="batch", mode="online", window=w, score_every=w, name=f"batch-online-{w}"
        )
    recorder = StepRecorder()
    start = time.perf_counter()
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder, *callbacks.values()]).fit(
        model, train_dataloaders=FixedBatches(batches)
    )
    fit_seconds = time.perf_counter() - start
    ids = torch.randperm(args.n, generator=torch.Generator().manual_seed(1))[: args.ids]
    start = time.perf_counter()
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, val)
    print(
        f"{args.model}, {args.optimizer} (lr {lr}, momentum {momentum}), {len(batches)} steps of {args.batch_size}, "
        f"{args.ids} ids; fit {fit_seconds:.0f} s, leave-one-out {time.perf_counter() - start:.0f} s"
    )
    print("| batch_norm, mode | Spearman | Pearson | seconds in the callback | max adjoint growth |")
    print("|---|---|---|---|---|")
    for name, cb in callbacks.items():
        s = torch.stack([cb.scores[int(i)] for i in ids])
        growth = float(cb.scores.metadata["max_adjoint_growth"])  # type: ignore[arg-type]
        print(f"| {name} | {spearman(s, truth):.3f} | {pearson(s, truth):.3f} | {cb.seconds:.1f} | {growth:.3g} |")


if __name__ == "__main__":
    main()
