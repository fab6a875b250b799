"""Quick start: a plain LightningModule made influence-aware in a few lines.

Trains a small MLP on scikit-learn's digits with 5% of the training labels flipped, with the
DiffIn callback on the Trainer, then prints the most harmful and most helpful training samples.
Score = predicted change of the validation loss (nats) when the sample is removed from
training: positive helps, negative hurts.

    python examples/quickstart.py        # needs: pip install -e ".[data]"
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import DiffIn, IndexedDataset, InfluenceMixin


class Net(L.LightningModule):
    """An ordinary LightningModule; the influence-aware subclass below adds the mixin and a per-sample loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, _ids = batch  # IndexedDataset appends each sample's id
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, _ids = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


# --- the influence-aware version: the mixin plus the unreduced loss -------------------------
class InfluenceNet(InfluenceMixin, Net):
    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ids = batch
        return F.cross_entropy(self(x), y, reduction="none")  # its mean is training_step's loss


def main() -> None:
    torch.set_num_threads(1)  # tiny model: a thread pool only slows it down
    L.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:1200], perm[1200:1500]
    y_train = y[tr].clone()
    flipped = torch.randperm(len(tr), generator=g)[:60]  # 5% label noise to find
    y_train[flipped] = (y_train[flipped] + torch.randint(1, 10, (60,), generator=g)) % 10

    train = DataLoader(IndexedDataset(TensorDataset(x[tr], y_train)), batch_size=32, shuffle=True, generator=g)
    val = DataLoader(IndexedDataset(TensorDataset(x[va], y[va])), batch_size=300)

    model = InfluenceNet()
    trainer = L.Trainer(
        max_epochs=8,
        callbacks=[DiffIn(target="val", mode="replay")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)

    scores = model.influence
    flipped_set = set(flipped.tolist())
    for title, (ids, values) in (("most harmful", scores.most_harmful(10)), ("most helpful", scores.most_helpful(10))):
        print(f"\n10 {title} training samples (id, score, label, flipped?):")
        for i, v in zip(ids.tolist(), values.tolist()):
            print(f"  {i:5d}  {v:+.3e}  {int(y_train[i])}  {'flipped' if i in flipped_set else ''}")
    harmful_ids, _ = scores.most_harmful(len(flipped))
    found = len(flipped_set & set(harmful_ids.tolist()))
    print(f"\n{found} of the {len(flipped)} flipped labels are among the {len(flipped)} most harmful samples.")


if __name__ == "__main__":
    main()
