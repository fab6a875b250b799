"""The embedded models' evaluation metrics (``val_loss``, ``val_acc``, ``test_acc``) are means over
the whole evaluation set, each sample once: in one process, and across the processes of a DDP run
whose DistributedSampler shards the set and pads the shards with repeated samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import Classifier, SampleMean, SmallCNN

ROOT = Path(__file__).resolve().parents[1]

# Two gloo processes evaluate one seeded, untrained model (no fit: the metric is what is tested,
# and process start-up dominates) on the digits validation (300) and test (297: the sampler pads
# rank 1's shard with a repeated sample) sets; rank 0 saves the model and the logged results.
DDP_EVALUATION = """
import json, sys
import lightning as L
import torch
from lightning_influence.data import DigitsDataModule
from lightning_influence.models import {model}

torch.set_num_threads(1)
L.seed_everything(0, verbose=False)
model = {model}()
dm = DigitsDataModule(batch_size=64)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
test = trainer.test(model, datamodule=dm, verbose=False)[0]
val = trainer.validate(model, datamodule=dm, verbose=False)[0]
if trainer.global_rank == 0:
    torch.save(model.state_dict(), sys.argv[1] + "/model.pt")
    with open(sys.argv[1] + "/results.json", "w") as f:
        json.dump({{**test, **val, "world_size": trainer.world_size}}, f)
"""


def _full_set(dataset) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])
    return x, y


@pytest.mark.slow
def test_ddp_evaluation_reports_the_whole_set_like_one_process(tmp_path: Path) -> None:
    script = tmp_path / "evaluate.py"
    script.write_text(textwrap.dedent(DDP_EVALUATION.format(model="Classifier")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["world_size"] == 2

    model = Classifier()
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    model.eval()
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    with torch.no_grad():
        x, y = _full_set(dm.test_set)
        test_acc = (model(x).argmax(-1) == y).double().mean().item()
        x, y = _full_set(dm.val_set)
        logits = model(x)
        val_acc = (logits.argmax(-1) == y).double().mean().item()
        val_loss = F.cross_entropy(logits.double(), y).item()
    assert len(dm.test_set) == 297  # odd: the DistributedSampler repeats a sample on rank 1
    # Accuracies are counts over the set: exactly one process's value; the loss up to float32 summation.
    assert got["test_acc"] == pytest.approx(test_acc, abs=1e-12)
    assert got["val_acc"] == pytest.approx(val_acc, abs=1e-12)
    assert got["val_loss"] == pytest.approx(val_loss, rel=1e-6)
    assert "sync_dist" not in proc.stderr  # Lightning's warning of a metric left to one rank's shard
    # ... and one process through Lightning gives the same numbers.
    one = quiet_trainer(devices=1)
    assert one.test(model, datamodule=dm, verbose=False)[0]["test_acc"] == pytest.approx(test_acc, abs=1e-12)


def test_each_sample_counts_once_and_batches_without_ids_count_as_they_come() -> None:
    metric = SampleMean()
    metric.update(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 2]))
    metric.update(torch.tensor([1.0, 0.0]), torch.tensor([3, 0]))  # id 0 again: a padded repeat
    assert float(metric.compute()) == pytest.approx(3 / 4)
    metric.reset()
    metric.update(torch.tensor([1.0, 0.0, 0.0]))
    assert float(metric.compute()) == pytest.approx(1 / 3)


@pytest.mark.parametrize("model_class", [Classifier, SmallCNN])
def test_one_process_metrics_are_the_set_means(model_class) -> None:  # type: ignore[no-untyped-def]
    """(x, y) loaders (no id column) and (x, y, id) loaders give the mean over the set, whatever
    the batch sizes."""
    L.seed_everything(0, verbose=False)
    model = model_class()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 64, generator=g), torch.randint(0, 10, (50,), generator=g)
    with torch.no_grad():
        logits = model(x)
    acc = (logits.argmax(-1) == y).double().mean().item()
    loss = F.cross_entropy(logits.double(), y).item()
    trainer = quiet_trainer()
    plain = DataLoader(TensorDataset(x, y), batch_size=16)
    indexed = DataLoader(TensorDataset(x, y, torch.arange(50)), batch_size=7)
    for loader in (plain, indexed):
        assert trainer.test(model, dataloaders=loader, verbose=False)[0]["test_acc"] == pytest.approx(acc, abs=1e-12)
        val = trainer.validate(model, dataloaders=loader, verbose=False)[0]
        assert val["val_acc"] == pytest.approx(acc, abs=1e-12) and val["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert not [k for k in model.state_dict() if "metric" in k]  # checkpoints hold the weights only
