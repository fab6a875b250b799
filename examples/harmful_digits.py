"""See the most harmful and most helpful training digits, with their labels.

Trains the embedded digits MLP (`lightning_influence.models.Classifier`) with 5% of the training
labels flipped and `DiffIn(target="val")` on the Trainer, then draws two image grids: the 15 most
harmful training samples (lowest scores: removing them would lower the validation loss) and the
15 most helpful, each captioned with its label, its score and, for flipped samples, the true
label. Also prints per-class score summaries.

    python examples/harmful_digits.py [--out harmful_digits.png]     # needs: pip install -e ".[data,plots]"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from lightning_influence import DiffIn
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import Classifier
from lightning_influence.plots import image_grid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("harmful_digits.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(label_noise=0.05, seed=0)
    model = Classifier(hidden=(32,), lr=0.1)
    trainer = L.Trainer(
        max_epochs=8, callbacks=[DiffIn(target="val")], logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=data)
    scores = model.influence
    dataset = data.train_set
    flipped = set(data.flipped_ids.tolist())
    clean = data.clean_labels if getattr(data, "clean_labels", None) is not None else None

    def panel(ids: torch.Tensor, values: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
        images, captions = [], []
        for i, v in zip(ids.tolist(), values.tolist()):
            x, y, _ = dataset[i]
            note = f" (true {int(clean[i])})" if i in flipped and clean is not None else " (flipped)" if i in flipped else ""
            images.append(x)
            captions.append(f"#{i} label {int(y)}{note}\n{v:+.1e}")
        return images, captions

    for kind, (ids, values) in (("harmful", scores.most_harmful(15)), ("helpful", scores.most_helpful(15))):
        images, captions = panel(ids, values)
        path = args.out.with_name(f"{args.out.stem}_{kind}{args.out.suffix}")
        image_grid(path, images, captions, columns=5, title=f"15 most {kind} training digits (score: val-loss change if removed)")
        found = sum(i in flipped for i in ids.tolist())
        print(f"{path}: {found} of the 15 most {kind} samples have flipped labels")

    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    print("\nper class (label as trained): count, mean score, share harmful")
    for label, summary in scores.per_class(labels).items():
        print(f"  {label}: {summary['count']:4d}  {summary['mean']:+.2e}  {summary['harmful_fraction']:.0%}")


if __name__ == "__main__":
    main()
