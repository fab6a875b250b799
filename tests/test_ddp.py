"""DiffIn under Lightning's DDP strategies (2 CPU processes, gloo) gives the scores of one process
trained on the same sequence of global batches.

Each distributed run is a script written into ``tmp_path`` and run with ``subprocess.run``: the
DDP launcher re-executes its own script for the other rank, and must not re-execute pytest.
Process start-up dominates, so one run carries several callbacks (train/val targets, replay
and online modes) and the checkpoints that the resume run starts from:

- ``ddp`` (subprocess launcher): 255 training samples (the DistributedSampler pads each epoch
  with a repeated sample, trained on twice), 101 validation samples (a padded, sharded
  validation loader), SGD with momentum, gradient accumulation over 2 micro-batches, 3 epochs
  of 4 optimizer steps; checkpoints every epoch.
- ``ddp_spawn`` resumed from the first epoch's checkpoint: same scores as the uninterrupted DDP
  run, read in the launching process.
- the Hydra entry point with ``trainer=ddp``: one run, one output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from conftest import quiet_trainer
from lightning_influence import DiffIn, InfluenceScores
from lightning_influence.data import FixedBatches, load_digits_tensors
from lightning_influence.distributed import Collective, distributed_shard
from lightning_influence.scores import ScoreAccumulator
from lightning_influence.models import Classifier

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, BATCH, EPOCHS, WORLD, ACCUMULATE = 255, 101, 16, 3, 2, 2
MICRO_BATCHES = -(-N_TRAIN // WORLD) // BATCH  # 128 samples per rank: 8 micro-batches an epoch
STEPS_PER_EPOCH = MICRO_BATCHES // ACCUMULATE
RTOL = 1e-9

# The callbacks of every run: name -> DiffIn options. The training-loss target of the reference
# (one process) is the same function, the mean loss over the 255 training samples, given as an
# explicit target loader over them (its subset by position equals the DDP run's subset by id).
# Central differences: a forward difference amplifies the rounding of its two gradients (DDP sums
# the ranks' gradients in another order than one process does) by 1 / step ~ 1e8; see FORWARD_RTOL.
CALLBACKS = {
    "train_replay": dict(target="train", finite_difference="central"),
    "train_online": dict(target="train", mode="online", window=2, score_every=1, target_samples=100, finite_difference="central"),
    "val_replay": dict(target="val", finite_difference="central"),
    "val_online": dict(target="val", mode="online", window=3, score_every=2, target_samples=60, finite_difference="central"),
    "val_replay_recomputed": dict(target="val", checkpoint_every=2, finite_difference="central"),
    "val_replay_recomputed_gradients": dict(target="val", checkpoint_every=2, recompute="gradients", finite_difference="central"),
    "val_replay_forward": dict(target="val"),
}
# Forward differences also take each step's per-sample losses from training_step, computed per
# shard here and per global batch in one process (rounding differs): measured 1.0e-8.
FORWARD_RTOL = 1e-7
# SGD with momentum and weight decay: the scores are well conditioned (reordering the samples of each
# batch in one process moves them by ~1e-13 relative; with Adam, whose update divides by the root of
# near-zero second moments, by ~3e-8).
OPTIMIZER = {"momentum": 0.9, "weight_decay": 1e-3}

COMMON = """
import json, os, sys
from pathlib import Path
import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from lightning_influence import DiffIn
from lightning_influence.data import IndexedDataset, load_digits_tensors
from lightning_influence.models import Classifier

torch.set_num_threads(1)
ARGS = json.loads(Path(sys.argv[1]).read_text())
OPTIMIZER = ARGS["optimizer"]


def data():
    x, y = load_digits_tensors(torch.float64)
    train = IndexedDataset(TensorDataset(x[:ARGS["n_train"]], y[:ARGS["n_train"]]))
    start = ARGS.get("val_start", 1000)
    val = IndexedDataset(TensorDataset(x[start : start + ARGS["n_val"]], y[start : start + ARGS["n_val"]]))
    # A shuffling validation loader: Lightning shards it with a shuffling DistributedSampler, which
    # the targets read in order (target_samples subsets are by position).
    return DataLoader(train, batch_size=ARGS["batch"], shuffle=True), DataLoader(val, batch_size=50, shuffle=True)


def callbacks():
    # Several DiffIn callbacks of the same target and mode: a name each, for distinct checkpoint state keys.
    return {name: DiffIn(name=name, **options) for name, options in ARGS["callbacks"].items()}


def fit(strategy, ckpt_dir=None, ckpt_path=None):
    torch.manual_seed(0)
    model = Classifier(hidden=(16,), lr=0.05, optimizer_options=OPTIMIZER).double()
    cbs = callbacks()
    extra = [ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1)] if ckpt_dir else []
    trainer = L.Trainer(
        accelerator="cpu", devices=ARGS["world"], strategy=strategy, max_epochs=ARGS["epochs"], logger=False,
        enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accumulate_grad_batches=ARGS["accumulate"], callbacks=[*cbs.values(), *extra],
    )
    train, val = data()
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    return trainer, model, cbs


def save(path, cbs, **extra):
    payload = {name: {"ids": cb.scores.ids, "values": cb.scores.values, "meta": json.dumps(cb.scores.metadata)}
               for name, cb in cbs.items()}
    torch.save({**payload, **extra}, path)
"""

DDP_SCRIPT = COMMON + """
trainer, model, cbs = fit("ddp", ckpt_dir=ARGS["ckpt_dir"])
# Every rank holds the reduced scores; only rank zero writes.
influence_is_set = model.influence is list(cbs.values())[-1].scores  # the last callback's, on every rank
if trainer.is_global_zero:
    save(ARGS["out"], cbs, influence_is_set=influence_is_set)
else:
    Path(ARGS["out"] + ".rank%d" % trainer.global_rank).write_text(str(influence_is_set))
"""

SPAWN_SCRIPT = COMMON + """
if __name__ == "__main__":
    ckpts = sorted(Path(ARGS["ckpt_dir"]).glob("*.ckpt"))
    trainer, model, cbs = fit("ddp_spawn", ckpt_path=str(ckpts[0]))
    # This is the launching process: the workers' scores reach it through the callbacks (reading
    # scores also brings the counters of the workers' run).
    assert all(cb.scores is not None for cb in cbs.values())
    save(ARGS["out"], cbs, steps_seen=cbs["val_replay"].steps_seen, resumed_from=ckpts[0].name, pid=os.getpid())
"""


def _run_script(tmp_path: Path, name: str, source: str, timeout: float = 400, check: bool = True, **args) -> subprocess.CompletedProcess:
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(source))
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(dict(n_train=N_TRAIN, n_val=N_VAL, batch=BATCH, epochs=EPOCHS, world=WORLD, accumulate=ACCUMULATE, callbacks=CALLBACKS, optimizer=OPTIMIZER, **args)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run([sys.executable, str(script), str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# ---------------------------------------------------------------------- the single-process reference
def _datasets():
    x, y = load_digits_tensors(torch.float64)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[1000 : 1000 + N_VAL], y[1000 : 1000 + N_VAL])


def _global_batches(x, y):
    """The DDP run's global batches: each step's union of the ranks' DistributedSampler shards (seed 0,
    reshuffled per epoch, padded by repeating the epoch's first samples)."""
    dataset = TensorDataset(x)
    batches = []
    for epoch in range(EPOCHS):
        shards = []
        for rank in range(WORLD):
            sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            shards.append(torch.tensor(list(sampler)))
        for start in range(0, len(shards[0]), BATCH):
            ids = torch.cat([s[start : start + BATCH] for s in shards])
            batches.append((x[ids], y[ids], ids))
    return batches


def _reference() -> dict[str, DiffIn]:
    (x, y), (xv, yv) = _datasets()
    batches = _global_batches(x, y)
    assert len(batches) == EPOCHS * MICRO_BATCHES
    counts = torch.bincount(torch.cat([b[2] for b in batches[:MICRO_BATCHES]]), minlength=N_TRAIN)
    assert counts.max() == 2 and int((counts == 2).sum()) == 1  # one sample padded in: trained on twice an epoch
    train_set = [(x[i : i + 64], y[i : i + 64], torch.arange(i, min(i + 64, N_TRAIN))) for i in range(0, N_TRAIN, 64)]
    val_set = [(xv[i : i + 50], yv[i : i + 50], torch.arange(i, min(i + 50, N_VAL))) for i in range(0, N_VAL, 50)]
    callbacks = {}
    for name, options in CALLBACKS.items():
        options = {**options, "target": "val", "target_loader": FixedBatches(train_set if name.startswith("train") else val_set)}
        callbacks[name] = DiffIn(**options, name=name)
    torch.manual_seed(0)
    model = Classifier(hidden=(16,), lr=0.05, optimizer_options=OPTIMIZER).double()
    trainer = quiet_trainer(callbacks=list(callbacks.values()), accumulate_grad_batches=ACCUMULATE)
    trainer.fit(model, train_dataloaders=FixedBatches(batches))
    return callbacks


def _assert_same(got: dict, expected: dict[str, InfluenceScores], rtol: float = RTOL) -> None:
    for name, scores in expected.items():
        ids, values = got[name]["ids"], got[name]["values"]
        assert torch.equal(ids, scores.ids), name
        scale = float(scores.values.abs().max())
        error = float((values - scores.values).abs().max())
        print(f"{name}: max |DDP - reference| / max |reference| = {error / scale:.2e}")  # shown with pytest -s
        assert error <= rtol * scale, f"{name}: max deviation {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process DDP fit (and the reference), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("ddp")
    _run_script(tmp, "ddp_fit", DDP_SCRIPT, out=str(tmp / "scores.pt"), ckpt_dir=str(tmp / "ckpt"))
    got = torch.load(tmp / "scores.pt", weights_only=True)
    return tmp, got, {name: cb.scores for name, cb in _reference().items()}


def test_ddp_scores_equal_one_process_over_the_global_batches(ddp_run):
    """target train and val, replay and online (truncated windows, target subsets): same scores."""
    tmp, got, reference = ddp_run
    _assert_same(got, {k: v for k, v in reference.items() if k != "val_replay_forward"})
    _assert_same(got, {"val_replay_forward": reference["val_replay_forward"]}, rtol=FORWARD_RTOL)
    for name in CALLBACKS:
        meta = json.loads(got[name]["meta"])
        assert meta["world_size"] == WORLD and meta["steps_seen"] == EPOCHS * STEPS_PER_EPOCH, name
        assert len(got[name]["ids"]) == N_TRAIN
    assert json.loads(got["val_online"]["meta"])["truncated_sweeps"] >= 3
    assert json.loads(got["train_online"]["meta"])["truncated_sweeps"] >= 8
    # Every rank exposes the reduced scores on the module; only rank zero wrote the score file.
    assert got["influence_is_set"] and (tmp / "scores.pt.rank1").read_text() == "True"
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("scores")) == ["scores.pt", "scores.pt.rank1"]


def test_ddp_checkpoint_holds_every_ranks_shards(ddp_run):
    tmp, _, _ = ddp_run
    ckpts = sorted((tmp / "ckpt").glob("*.ckpt"))
    assert len(ckpts) == EPOCHS
    states = torch.load(ckpts[0], map_location="cpu", weights_only=True)["callbacks"]
    (state,) = (v for k, v in states.items() if k.endswith("'name': 'val_replay'}"))  # DiffIn(name="val_replay")
    assert state["world_size"] == WORLD and len(state["records"]) == STEPS_PER_EPOCH
    shards = state["rank_records"]
    assert len(shards) == WORLD and all(len(r) == STEPS_PER_EPOCH for r in shards)
    # An online callback's setup holds the fingerprint of every rank's shard of its target data.
    (online,) = (v for k, v in states.items() if "'name': 'val_online'" in k)
    shards = online["signature"]["target data"]
    assert [s.split(":")[0] for s in shards] == ["rank 0", "rank 1"] and shards[0].split(":")[1] != shards[1].split(":")[1]
    shards = state["rank_records"]
    for step, record in enumerate(state["records"]):
        assert len(record["global_ids"]) == ACCUMULATE
        for k in range(ACCUMULATE):
            union = torch.cat([shards[r][step]["ids"][k] for r in range(WORLD)])
            assert torch.equal(record["global_ids"][k], union)


@pytest.mark.slow
def test_ddp_spawn_resume_gives_the_uninterrupted_ddp_scores(ddp_run):
    """Resumed under ddp_spawn from the first epoch's checkpoint: the scores of the uninterrupted DDP
    run, exposed by the callbacks of the launching process."""
    tmp, straight, _ = ddp_run
    _run_script(tmp, "spawn_resume", SPAWN_SCRIPT, out=str(tmp / "resumed.pt"), ckpt_dir=str(tmp / "ckpt"))
    resumed = torch.load(tmp / "resumed.pt", weights_only=True)
    assert resumed["resumed_from"].startswith("epoch=0") and resumed["steps_seen"] == EPOCHS * STEPS_PER_EPOCH
    expected = {name: InfluenceScores(straight[name]["ids"], straight[name]["values"]) for name in CALLBACKS}
    _assert_same(resumed, expected, rtol=1e-12)
    for name in CALLBACKS:
        a, b = json.loads(straight[name]["meta"]), json.loads(resumed[name]["meta"])
        for key in ("steps_seen", "steps_scored", "truncated_sweeps", "skipped_steps"):
            assert a[key] == b[key], (name, key)
    assert not list(Path(tempfile_dir()).glob(f"lightning-influence-diffin-{resumed['pid']}-*"))  # hand-over files read


@pytest.mark.slow
def test_ddp_online_resume_with_other_target_data_is_refused(ddp_run):
    """Resumed under ddp_spawn with validation data one sample further on: the online callbacks' score
    sums were taken against the checkpoint's target, so the resume is refused, naming each rank's shard."""
    tmp, _, _ = ddp_run
    proc = _run_script(tmp, "spawn_other_target", SPAWN_SCRIPT, check=False, out=str(tmp / "other.pt"), ckpt_dir=str(tmp / "ckpt"), val_start=1001)
    assert proc.returncode != 0
    assert "target data" in proc.stderr and "rank 1:" in proc.stderr, proc.stderr[-3000:]


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


@pytest.mark.slow
def test_hydra_entry_point_with_trainer_ddp(tmp_path):
    """``python -m lightning_influence trainer=ddp``: one run (Lightning re-runs the command for rank 1 into
    the parent's run folder, without its own .hydra folder), scores of every training sample computed by
    both ranks, no other output folder."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lightning_influence", "trainer=ddp", "model=logreg", "trainer.max_epochs=1",
        "data.batch_size=64", "recipe.seeds=[0]", "recipe.plots=false", f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((run_dir / "report.json").read_text())
    scores = InfluenceScores.load(run_dir / "scores.pt")
    assert report["num_scored"] == len(scores) == 1200
    assert scores.metadata["world_size"] == 2 and scores.metadata["steps_seen"] == 10  # 600 samples per rank, 64 a batch
    assert torch.isfinite(scores.values).all() and (scores.values != 0).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the child rank wrote nowhere else
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


@pytest.mark.slow
def test_hydra_multirun_sweep_with_ddp_spawn(tmp_path):
    """``-m trainer=ddp trainer.strategy=ddp_spawn seed=0,1``: the spawn launcher runs each job's fits in
    worker processes that never re-run the sweep; every job writes its own complete run folder."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lightning_influence", "-m", "trainer=ddp", "trainer.strategy=ddp_spawn", "seed=0,1",
        "recipe=coreset", "recipe.fraction=0.5", "model=logreg", "trainer.max_epochs=1", "data.batch_size=64",
        "recipe.seeds=[0]", "recipe.plots=false", f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]  # two jobs, no stray sweeps
    for job in ("0", "1"):
        report = json.loads((sweep / job / "report.json").read_text())
        assert report["score_metadata"]["world_size"] == 2 and report["num_scored"] == 1200
        assert report["num_kept"] == 600 and 0.0 < report["test_acc"]["mean"] <= 1.0
    first, second = (InfluenceScores.load(sweep / job / "scores.pt") for job in ("0", "1"))
    assert not torch.equal(first.values, second.values)  # the sweep's seeds reached the workers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


# ---------------------------------------------------------------------- in-process, no processes started
def test_collective_is_a_no_op_in_one_process():
    one = Collective()
    x = torch.arange(3.0)
    assert one.sum(x) is x and one.mean(x) is x and one.gather(x)[0] is x and one.broadcast(x) is x and one.any(True) and not one.any(False)
    acc = ScoreAccumulator(4)
    assert acc.reduced(one) is acc
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        Collective(2, 0)


def test_distributed_shard_reads_the_sampler():
    dataset = TensorDataset(torch.arange(11))
    loader = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False), batch_size=4)
    assert distributed_shard(loader) == (1, 2, 11)
    assert distributed_shard(DataLoader(dataset)) is None
    # rank 1 yields positions 1, 3, ..., 11: the last is the padding copy of position 0
    positions = 1 + torch.arange(6) * 2
    assert ((positions < 11).tolist()) == [True] * 5 + [False]


def test_sharded_strategies_are_refused(small_digits):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cb = DiffIn(target="val", target_loader=small_digits.val)

    class Trainer:
        strategy = object.__new__(DeepSpeedStrategy)

    with pytest.raises(ValueError, match="does not support strategy DeepSpeedStrategy.*sharded strategies"):
        cb.setup(Trainer(), Classifier(), "fit")  # type: ignore[arg-type]


def _exit_worker(rank: int, init_file: str, marker_dir: str) -> None:
    import atexit

    import torch.distributed as dist

    from lightning_influence.distributed import destroy_process_group_at_exit

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dist.all_reduce(torch.ones(3))
    # atexit runs last-in first-out: this check runs after the library's hook.
    atexit.register(lambda: Path(marker_dir, f"rank{rank}-{dist.is_initialized()}").touch())
    destroy_process_group_at_exit()
    destroy_process_group_at_exit()  # registered once per process


def test_the_process_group_is_destroyed_before_the_process_exits(tmp_path):
    """Gloo groups left to interpreter teardown can abort a finished worker (SIGABRT): the library
    destroys the default group at exit in every process that scored under DDP."""
    import torch.multiprocessing as mp

    mp.spawn(_exit_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("rank")) == ["rank0-False", "rank1-False"]


def test_trajectory_ground_truth_under_ddp_is_refused(tmp_path):
    """The deletion recipe's trajectory retraining records batches with StepRecorder, which sees one
    rank's shards under DDP: refused before training instead of retraining on half the data."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lightning_influence", "recipe=deletion", "trainer=ddp", "model=logreg", "trainer.max_epochs=1",
        "recipe.seeds=[0]", "recipe.plots=false", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "StepRecorder records the batches one process sees" in proc.stderr and "devices=1" in proc.stderr
