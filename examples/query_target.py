"""A custom target: which training samples drive the prediction on *these* test samples?

``DiffIn(target="query", target_loader=...)`` gives one score column per query sample: an
N x Q matrix. Entry (i, q) is the predicted change of query q's loss (nats) when training sample
i is removed: positive means i helps the model on q, negative means i hurts it. Here the queries
are the test digits the trained model gets wrong; the example prints, for each, the training
samples that pushed it there (most harmful) and those that pulled the other way (most helpful).

    python examples/query_target.py        # needs: pip install -e ".[data]"
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_influence import DiffIn, IndexedDataset, InfluenceMixin
from lightning_influence.data import load_digits_tensors


class Net(InfluenceMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def per_sample_loss(self, batch):  # type: ignore[no-untyped-def]
        x, y, _ids = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_set = IndexedDataset(TensorDataset(x[perm[:1200]], y[perm[:1200]]))
    test_x, test_y = x[perm[1200:]], y[perm[1200:]]

    # A first fit finds the test samples the model gets wrong: those become the queries.
    probe = Net()
    L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
        probe, DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    )
    with torch.no_grad():
        wrong = (probe.net(test_x).argmax(1) != test_y).nonzero().reshape(-1)[:4]
    queries = IndexedDataset(Subset(TensorDataset(test_x, test_y), wrong.tolist()))
    print(f"{len(wrong)} misclassified test digits become the queries: labels {test_y[wrong].tolist()}")

    # The same run again, now with the callback: one score column per query.
    L.seed_everything(0, verbose=False)
    model = Net()
    diffin = DiffIn(target="query", target_loader=DataLoader(queries, batch_size=len(queries)))
    trainer = L.Trainer(
        max_epochs=3, callbacks=[diffin], logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)))
    scores = model.influence
    print(f"score matrix: {tuple(scores.values.shape)} (training samples x queries)")
    train_labels = y[perm[:1200]]
    for q in range(scores.num_queries or 0):
        harmful, h_values = scores.most_harmful(3, query=q)
        helpful, p_values = scores.most_helpful(3, query=q)
        print(f"\nquery {q} (true label {int(test_y[wrong[q]])}):")
        print("  most harmful: " + ", ".join(f"#{i} label {int(train_labels[i])} ({v:+.2e})" for i, v in zip(harmful.tolist(), h_values.tolist())))
        print("  most helpful: " + ", ".join(f"#{i} label {int(train_labels[i])} ({v:+.2e})" for i, v in zip(helpful.tolist(), p_values.tolist())))


if __name__ == "__main__":
    main()
