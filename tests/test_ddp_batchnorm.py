"""DiffIn on a batch-norm model trained under DDP (2 CPU processes, gloo), checked against actual
leave-one-out retraining with DDP's own batch-norm semantics.

Under DDP (without ``SyncBatchNorm``) each rank normalises its shard with the shard's statistics,
the ranks' gradients are averaged, and the running statistics that the saved model and the
evaluation-mode target use are rank zero's: DDP broadcasts rank zero's buffers before each step's
first forward (and with ``broadcast_buffers=False`` rank zero's module still holds its own chain),
so only rank zero's shards move them. The reference below retrains exactly that in one process:
the recorded shards of every step, each normalised on its own, the losses averaged over the global
batch without the removed sample, only rank zero's forwards writing the running statistics. With
nothing removed it lands on the DDP run's parameters and rank zero's statistics (checked).
"""

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
from torch import nn

from lightning_influence.data import load_digits_tensors
from lightning_influence.evaluation import spearman
from lightning_influence.models import Classifier

ROOT = Path(__file__).resolve().parents[1]
# 255 samples: the DistributedSampler pads each epoch with a repeat (a sample on both ranks, or twice
# on one); micro-batches of 16 per rank, 2 accumulated per step, 4 epochs of 4 steps.
N_TRAIN, N_VAL, BATCH, EPOCHS, WORLD, ACCUMULATE, LR = 255, 100, 16, 4, 2, 2, 0.05
OPTIMIZER = {"momentum": 0.9}
CALLBACKS = {
    "replay": dict(target="val"),  # batch_norm="auto": scored as trained, linear removal
    "online": dict(target="val", mode="online", window=4, score_every=4),  # swept during fit
    "running": dict(target="val", batch_norm="running"),  # evaluation mode, for comparison
}

COMMON = """
import json, sys
from pathlib import Path
import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_influence import DiffIn
from lightning_influence.data import IndexedDataset, load_digits_tensors
from lightning_influence.models import Classifier

torch.set_num_threads(1)
ARGS = json.loads(Path(sys.argv[1]).read_text())


def bn_mlp():
    torch.manual_seed(0)
    model = Classifier(hidden=(16,), lr=ARGS["lr"], optimizer_options=ARGS["optimizer"])
    model.net = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
    return model.double()


class Shards(L.Callback):
    # each rank's micro-batch ids in training order, and its running statistics at the end
    def __init__(self):
        self.ids = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(batch[2].tolist())
    def on_train_end(self, trainer, pl_module):
        buffers = {k: v.tolist() for k, v in pl_module.state_dict().items() if "running" in k}
        Path(ARGS["out"] + f".rank{trainer.global_rank}.json").write_text(json.dumps({"ids": self.ids, "buffers": buffers}))


def trainer(callbacks, epochs, strategy="ddp", checkpoints=False):
    return L.Trainer(
        accelerator="cpu", devices=ARGS["world"], strategy=DDPStrategy(start_method={"ddp": "popen", "ddp_spawn": "spawn"}[strategy], **ARGS["ddp"]),
        max_epochs=epochs, logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accumulate_grad_batches=ARGS["accumulate"], callbacks=callbacks,
    )


def save(path, cbs, **extra):
    scores = {name: {"ids": cb.scores.ids, "values": cb.scores.values, "meta": json.dumps(cb.scores.metadata)} for name, cb in cbs.items()}
    torch.save({"scores": scores, **extra}, path)


x, y = load_digits_tensors(torch.float64)
n, start = ARGS["n_train"], 1000
train = DataLoader(IndexedDataset(TensorDataset(x[:n], y[:n])), batch_size=ARGS["batch"], shuffle=True)
val = DataLoader(IndexedDataset(TensorDataset(x[start:start + ARGS["n_val"]], y[start:start + ARGS["n_val"]])), batch_size=50)
cbs = {name: DiffIn(name=name, **options) for name, options in ARGS["callbacks"].items()}
"""

SCRIPT = COMMON + """
checkpoints = ModelCheckpoint(dirpath=ARGS["ckpt_dir"], every_n_epochs=1, save_top_k=-1)
model = bn_mlp()
run = trainer([*cbs.values(), Shards(), checkpoints], ARGS["epochs"], checkpoints=True)
run.fit(model, train_dataloaders=train, val_dataloaders=val)
if run.is_global_zero:
    save(ARGS["out"], cbs, params={k: v.detach().clone() for k, v in model.named_parameters()})
# The exact removal (sub-batches) is a single-process method: asked for under DDP, it is refused at setup.
try:
    trainer([DiffIn(target="val", batch_norm="batch", batch_norm_removal="exact")], 1).fit(bn_mlp(), train_dataloaders=train)
    message = "accepted"
except ValueError as err:
    message = str(err)
Path(ARGS["out"] + f".refusal{run.global_rank}").write_text(message)
"""

RESUME_SCRIPT = COMMON + """
if __name__ == "__main__":  # ddp_spawn: the workers import this file
    first = sorted(Path(ARGS["ckpt_dir"]).glob("*.ckpt"))[0]
    trainer(list(cbs.values()), ARGS["epochs"], strategy="ddp_spawn").fit(bn_mlp(), train_dataloaders=train, val_dataloaders=val, ckpt_path=str(first))
    save(ARGS["out"] + ".resumed", cbs, resumed_from=first.name)
"""


def _run(tmp_path: Path, source: str, **ddp: bool) -> Path:
    """Run ``source`` (a DDP script) in ``tmp_path``; the path its outputs start with."""
    name = "resume" if source is RESUME_SCRIPT else "ddp_bn"
    script, config, out = tmp_path / f"{name}.py", tmp_path / f"{name}.json", tmp_path / "out.pt"
    script.write_text(textwrap.dedent(source))
    config.write_text(json.dumps(dict(
        n_train=N_TRAIN, n_val=N_VAL, batch=BATCH, epochs=EPOCHS, world=WORLD, accumulate=ACCUMULATE, lr=LR,
        optimizer=OPTIMIZER, callbacks=CALLBACKS, ddp=ddp, out=str(out), ckpt_dir=str(tmp_path / "checkpoints"),
    )))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run([sys.executable, str(script), str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def _ddp_run(tmp_path: Path, **ddp: bool) -> tuple[dict, list[dict], list[str]]:
    """Run the script's DDP fit; rank zero's scores and parameters, every rank's shards and statistics,
    every rank's refusal message."""
    out = _run(tmp_path, SCRIPT, **ddp)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]
    refusals = [Path(f"{out}.refusal{r}").read_text() for r in range(WORLD)]
    return torch.load(out, weights_only=True), ranks, refusals


def _bn_mlp() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(hidden=(16,), lr=LR, optimizer_options=OPTIMIZER)
    model.net = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
    return model.double()


def _retrain(ranks: list[dict], removed: int | None = None) -> tuple[nn.Module, float]:
    """DDP's training replayed in one process without ``removed``: per step, each rank's shards normalised
    on their own, the loss averaged over the remaining samples of the global micro-batches, running
    statistics written by rank zero's forwards only. The model and its validation loss (evaluation mode)."""
    x, y = load_digits_tensors(torch.float64)
    model = _bn_mlp()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, **OPTIMIZER)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    micro = len(ranks[0]["ids"])
    for first in range(0, micro, ACCUMULATE):
        optimizer.zero_grad()
        count = min(ACCUMULATE, micro - first)
        for k in range(first, first + count):
            shards = [[i for i in rank["ids"][k] if i != removed] for rank in ranks]
            total = sum(len(s) for s in shards) * count
            loss = torch.zeros((), dtype=torch.float64)
            for r, shard in enumerate(shards):
                kept = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in layers]
                if r != 0:  # another rank's forward writes copies, which DDP overwrites with rank zero's
                    for m in layers:
                        m.running_mean, m.running_var, m.num_batches_tracked = m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()
                loss = loss + F.cross_entropy(model(x[shard]), y[shard], reduction="sum") / total
                for m, (mean, var, tracked) in zip(layers, kept, strict=True):
                    m.running_mean, m.running_var, m.num_batches_tracked = mean, var, tracked
            loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return model, float(F.cross_entropy(model(x[1000 : 1000 + N_VAL]), y[1000 : 1000 + N_VAL]))


@pytest.mark.parametrize("broadcast_buffers", [True, False], ids=["broadcast-buffers", "own-buffers"])
def test_ddp_batch_norm_scores_predict_leave_one_out_retraining_of_the_ddp_run(tmp_path, broadcast_buffers):
    out, ranks, refusals = _ddp_run(tmp_path, broadcast_buffers=broadcast_buffers)
    # The reference replays the DDP run: parameters and rank zero's running statistics to rounding.
    model, full = _retrain(ranks)
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), out["params"][name], rtol=0, atol=1e-12), name
    for name, value in model.state_dict().items():
        if "running" in name:
            assert torch.allclose(value, torch.tensor(ranks[0]["buffers"][name], dtype=value.dtype), rtol=0, atol=1e-12), name
    ids = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(1))[:60]
    truth = torch.tensor([_retrain(ranks, int(i))[1] - full for i in ids], dtype=torch.float64)
    got = {}
    for name, scores in out["scores"].items():
        meta = json.loads(scores["meta"])
        assert meta["world_size"] == WORLD
        position = {int(i): k for k, i in enumerate(scores["ids"])}
        values = torch.stack([scores["values"][position[int(i)]] for i in ids])
        got[name] = float(spearman(values, truth))
        pearson = float(torch.corrcoef(torch.stack([values, truth]))[0, 1])
        print(f"{name}: Spearman {got[name]:.3f}, Pearson {pearson:.3f} against DDP leave-one-out")  # pytest -s
        if name != "running":
            assert meta["batch_norm"] == "batch" and meta["batch_norm_removal"] == "linear"
            assert pearson >= 0.9
    assert meta["batch_norm"] == "running"
    # measured 0.997 (replay), 0.889 (online, window 4 of 16 steps), 0.772 (evaluation mode)
    assert got["replay"] >= 0.97
    assert got["online"] >= 0.8
    assert got["replay"] > got["running"] + 0.1
    for message in refusals:
        assert "batch_norm_removal='linear'" in message and "DDP" in message, message


@pytest.mark.slow
def test_ddp_batch_norm_resumed_under_ddp_spawn_gives_the_uninterrupted_scores(tmp_path):
    out, _, _ = _ddp_run(tmp_path, broadcast_buffers=True)
    resumed = torch.load(str(_run(tmp_path, RESUME_SCRIPT, broadcast_buffers=True)) + ".resumed", weights_only=True)
    assert resumed["resumed_from"].startswith("epoch=0")
    for name, scores in out["scores"].items():
        got = resumed["scores"][name]
        assert torch.equal(got["ids"], scores["ids"]), name
        error = float((got["values"] - scores["values"]).abs().max() / scores["values"].abs().max())
        assert error <= 1e-12, (name, error)  # measured 0


def test_sync_batchnorm_is_scored_in_evaluation_mode_by_auto_and_refused_as_trained():
    """``Trainer(sync_batchnorm=True)`` turns batch norm into ``SyncBatchNorm`` after the callbacks'
    ``setup`` (statistics over every rank's shard, not modelled): ``"auto"`` falls back to evaluation
    mode with a warning that names it, ``"batch"`` is refused. (``SyncBatchNorm`` runs on GPUs only,
    so the fit itself cannot run here: the Trainer is built, not launched.)"""
    from lightning_influence import DiffIn

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, logger=False)
    with pytest.warns(UserWarning, match=r"sync_batchnorm=True\) makes its batch norm SyncBatchNorm"):
        auto = DiffIn(target="val")
        auto.setup(trainer, _bn_mlp(), "fit")
    assert auto._batch_norm == "running"
    with pytest.raises(ValueError, match=r"sync_batchnorm=True\) makes the model's batch norm SyncBatchNorm"):
        DiffIn(target="val", batch_norm="batch").setup(trainer, _bn_mlp(), "fit")


UNEVEN_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import lightning as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_influence import DiffIn
from lightning_influence.data import IndexedDataset, load_digits_tensors
from lightning_influence.models import Classifier

torch.set_num_threads(1)
ARGS = json.loads(Path(sys.argv[1]).read_text())
torch.manual_seed(0)
model = Classifier(hidden=(16,), lr=0.05)
model.net = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
model = model.double()
x, y = load_digits_tensors(torch.float64)


class PerRank(L.LightningDataModule):
    # each rank its own loader (no DistributedSampler): rank 0 32 samples, rank 1 18, batches of 16
    def train_dataloader(self):
        rank = self.trainer.global_rank
        ids = torch.arange(32) if rank == 0 else torch.arange(32, 50)
        return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, sampler=ids.tolist())


callback = DiffIn(target="val", target_loader=DataLoader(IndexedDataset(TensorDataset(x[1000:1100], y[1000:1100])), batch_size=50))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, callbacks=[callback])
trainer.fit(model, datamodule=PerRank())
Path(ARGS["out"] + f".rank{trainer.global_rank}").write_text(json.dumps(callback.scores.metadata["batch_norm"]))
"""


def test_ranks_whose_last_batches_differ_take_the_same_batch_norm_mode(tmp_path):
    """Each rank's own loader (``use_distributed_sampler=False``): rank 1's last batch holds two samples,
    too few for BatchNorm1d once one is removed, rank 0 none. Every rank falls back to evaluation mode
    alike (the decision is reduced across ranks), instead of one rank sweeping in another mode than
    the other and both waiting in mismatched collectives (a hang)."""
    script, config, out = tmp_path / "uneven.py", tmp_path / "uneven.json", tmp_path / "mode"
    script.write_text(textwrap.dedent(UNEVEN_SCRIPT))
    config.write_text(json.dumps({"out": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run([sys.executable, str(script), str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"uneven run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(WORLD)] == ["running", "running"]
    assert "holds 2 sample(s), too few for batch norm" in proc.stderr  # warned on rank zero
