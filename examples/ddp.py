"""DiffIn under DDP: two processes (gloo on CPU; NCCL with accelerator="gpu"), the same callback.

Lightning launches the second process by re-running this script; each rank trains on its shard
of every batch and DiffIn reduces its per-sample sums across ranks, so the scores are those of
one process trained on the global batches. Only global rank zero prints and writes the score
file.

    python examples/ddp.py [--devices 2] [--strategy ddp|ddp_spawn] [--out ddp_scores.pt]   # needs: pip install -e ".[data]"
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from lightning_influence import DiffIn, InfluenceScores
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import Classifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "ddp_spawn"])
    parser.add_argument("--out", default="ddp_scores.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(label_noise=0.05, seed=0, batch_size=16)  # 16 per rank: global batch 32
    model = Classifier(hidden=(32,), lr=0.1)
    diffin = DiffIn(target="val", save_path=args.out)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=4,
        callbacks=[diffin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        scores: InfluenceScores = diffin.scores  # under ddp_spawn: read back from the workers
        data.setup("fit")
        flipped = set(data.flipped_ids.tolist())
        ids, values = scores.most_harmful(len(flipped))
        found = sum(i in flipped for i in ids.tolist())
        print(f"world size {trainer.world_size}: scored {len(scores)} samples; file {args.out}")
        print(f"{found} of the {len(flipped)} flipped labels are among the {len(flipped)} most harmful samples")


if __name__ == "__main__":
    main()
