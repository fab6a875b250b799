"""TracIn (online and over checkpoints) and the parameter-checkpoint callback, with real Trainer
runs on digits in float64, against brute-force references (an autograd loop over the replayed
steps) and leave-one-out retraining.

``python tests/test_tracin.py`` measures the README's Spearman correlations with leave-one-out."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import digits_problem, quiet_trainer  # noqa: E402
from lightning_influence.callbacks.checkpoints import (  # noqa: E402
    CheckpointFileError,
    ParameterCheckpoints,
    RecordedCheckpoints,
)
from lightning_influence.callbacks.tracin import TracIn as TracInCallback  # noqa: E402
from lightning_influence.estimators import build  # noqa: E402
from lightning_influence.estimators.tracin import TracInCheckpoints  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, spearman  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402


class TwoGroupClassifier(Classifier):
    """The MLP with its two layers in two parameter groups at different learning rates and a decaying schedule."""

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        first, last = self.net[0], self.net[-1]
        optimizer = torch.optim.SGD([{"params": first.parameters(), "lr": 0.1}, {"params": last.parameters(), "lr": 0.05}])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.05 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(problem, callbacks, *, model_class=Classifier, hidden=(16,), lr=0.1, **trainer_options):
    torch.manual_seed(0)
    model = model_class(hidden=hidden, lr=lr).double()
    recorder = StepRecorder()
    quiet_trainer(callbacks=[recorder, *callbacks], **trainer_options).fit(model, train_dataloaders=problem.train)
    return model, recorder


def _flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _brute_force_tracin(model, recorder, val_batches, group_of_param):
    """Replay the recorded plain-SGD steps by hand; at each step add eta_g/(n b) <grad_g F, grad_g l_z>
    with per-sample gradients from an autograd loop."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: recorder.initial_params[n].clone() for n in names}
    scores: dict[int, float] = {}

    def loss_at(batch):
        return torch.func.functional_call(model, params, (batch[0],))

    import torch.nn.functional as F

    for step in recorder.steps:
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        x_all = torch.cat([b[0] for b in val_batches])
        y_all = torch.cat([b[1] for b in val_batches])
        val_loss = F.cross_entropy(torch.func.functional_call(model, leaves, (x_all,)), y_all)
        grad_f = torch.autograd.grad(val_loss, list(leaves.values()))
        lr_of = {n: step.lrs[group_of_param[n]] for n in names}
        total_grad = {n: torch.zeros_like(p) for n, p in params.items()}
        for batch in step.batches:
            x, y, ids = batch
            for i in range(len(ids)):
                li = F.cross_entropy(torch.func.functional_call(model, leaves, (x[i : i + 1],)), y[i : i + 1])
                gi = torch.autograd.grad(li, list(leaves.values()))
                value = sum(lr_of[n] * float((a * b).sum()) for n, a, b in zip(names, gi, grad_f))
                scores[int(ids[i])] = scores.get(int(ids[i]), 0.0) + value / (step.normalizer * len(ids))
                for n, g in zip(names, gi):
                    total_grad[n] += g / (step.normalizer * len(ids))
        with torch.no_grad():
            for n in names:
                params[n] = params[n] - lr_of[n] * total_grad[n]
    return scores, params


@pytest.mark.parametrize("accumulate", [1, 2], ids=["plain", "accumulate2"])
def test_online_tracin_equals_brute_force_replay(accumulate):
    problem = digits_problem(n=96, batch_size=16, epochs=2, val_size=100)
    callback = TracInCallback(target="val", target_loader=problem.val)
    model, recorder = _fit(problem, [callback], model_class=TwoGroupClassifier, accumulate_grad_batches=accumulate)
    group_of = {"net.0.weight": 0, "net.0.bias": 0, "net.2.weight": 1, "net.2.bias": 1}
    expected, final = _brute_force_tracin(model, recorder, list(problem.val), group_of)
    # The replay really is the run: the same final parameters.
    for n, p in model.named_parameters():
        assert torch.allclose(final[n], p.detach(), atol=1e-12)
    scores = callback.scores
    assert scores is not None and model.influence is scores
    assert sorted(scores.ids.tolist()) == sorted(expected)
    got = torch.tensor([float(scores[i]) for i in expected], dtype=torch.float64)
    want = torch.tensor(list(expected.values()), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    assert scores.metadata["steps_seen"] == len(recorder.steps)
    assert scores.metadata["target_gradients"] == len(recorder.steps)


def test_checkpoint_tracin_every_step_equals_online_and_target_every_reuses(tmp_path):
    problem = digits_problem(n=128, batch_size=16, epochs=2, val_size=100)
    online = TracInCallback(target="val", target_loader=problem.val, save_path=tmp_path / "tracin.pt")
    reused = TracInCallback(target="val", target_loader=problem.val, target_every=4)
    reused._generate_state_key = lambda **kw: "reused"  # type: ignore[method-assign]
    visits = TracInCheckpoints(every=1, weighting="visits", progress=False)
    expected = TracInCheckpoints(every=1, progress=False)
    expected.callback()._generate_state_key = lambda **kw: "expected"  # type: ignore[union-attr, method-assign]
    model, recorder = _fit(problem, [online, reused, visits.callback(), expected.callback()], model_class=TwoGroupClassifier)
    a = online.scores
    b = visits.scores(model, problem.train, problem.val)
    assert torch.equal(a.ids.sort().values, b.ids)
    assert torch.allclose(torch.stack([a[int(i)] for i in b.ids]), b.values, rtol=1e-10, atol=1e-14)
    # Saved atomically, loadable without unpickling.
    from lightning_influence.scores import InfluenceScores

    assert torch.equal(InfluenceScores.load(tmp_path / "tracin.pt").values, a.values)
    # The classic (expected-visit) weighting spreads each step over all samples: same total.
    c = expected.scores(model, problem.train, problem.val)
    assert c.metadata["weighting"] == "expected" and c.metadata["checkpoints"] == len(recorder.steps)
    assert float(c.values.sum()) == pytest.approx(float(b.values.sum()), rel=0.3)
    # target_every=4: a quarter of the target gradients, scores close to the exact sum.
    assert reused.scores.metadata["target_gradients"] == (len(recorder.steps) + 3) // 4
    assert spearman(reused.scores.values, a.values) > 0.95


def test_checkpoint_callback_records_parameters_and_learning_rates(tmp_path):
    problem = digits_problem(n=96, batch_size=16, epochs=2, val_size=100)
    memory = ParameterCheckpoints(every=3)
    disk = ParameterCheckpoints(count=4, directory=tmp_path / "ckpt", sampling="random", seed=3)
    model, recorder = _fit(problem, [memory, disk], model_class=TwoGroupClassifier)
    record = memory.record
    assert record is not None and record.total_steps == len(recorder.steps) == 12
    assert [c.step for c in record] == [0, 3, 6, 9]
    assert torch.equal(record.step_lrs, torch.tensor([s.lrs for s in recorder.steps], dtype=torch.float64))
    assert [tuple(map(tuple, [i.tolist() for i in ids])) for ids in record.step_ids] == [
        tuple(tuple(b[2].tolist()) for b in s.batches) for s in recorder.steps
    ]
    # theta_t by replaying plain SGD from the recorded initial parameters.
    group_of = {"net.0.weight": 0, "net.0.bias": 0, "net.2.weight": 1, "net.2.bias": 1}
    params = {n: p.clone() for n, p in recorder.initial_params.items()}
    trajectory = []
    import torch.nn.functional as F

    for step in recorder.steps:
        trajectory.append({n: p.clone() for n, p in params.items()})
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        x, y, _ = step.batches[0]
        grads = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, leaves, (x,)), y), list(leaves.values()))
        params = {n: (p - step.lrs[group_of[n]] * g).detach() for (n, p), g in zip(params.items(), grads)}
    for c in record:
        assert c.lrs == recorder.steps[c.step].lrs
        for n, p in c.parameters().items():
            assert torch.allclose(p, trajectory[c.step][n], atol=1e-12)
    # The directory round-trips with weights_only=True, and no temporary file is left behind.
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(files) == 5 and "steps.pt" in files and not any(f.endswith(".tmp") for f in files)
    for name in files:
        torch.load(tmp_path / "ckpt" / name, weights_only=True)
    loaded = RecordedCheckpoints.load(tmp_path / "ckpt")
    assert [c.step for c in loaded] == [c.step for c in disk.record] and len(loaded) == 4
    assert torch.equal(loaded.step_lrs, record.step_lrs)
    for c in loaded:
        for n, p in c.parameters().items():
            assert torch.allclose(p, trajectory[c.step][n], atol=1e-12)
    # Checkpoint state (resume) round-trips through torch.save / weights_only load.
    import io

    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = ParameterCheckpoints(every=3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert [c.step for c in restored._checkpoints] == [0, 3, 6, 9]
    # A write that fails leaves the previous file intact (temporary file + rename).
    target_file = tmp_path / "ckpt" / "steps.pt"
    before = target_file.read_bytes()
    original = os.replace

    def failing_replace(*args, **kwargs):
        raise OSError("disk full")

    os.replace = failing_replace
    try:
        with pytest.raises(OSError):
            loaded.save(tmp_path / "ckpt")
    finally:
        os.replace = original
    assert target_file.read_bytes() == before
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ckpt").iterdir())


def test_tracin_scores_track_leave_one_out():
    problem = digits_problem(n=256, batch_size=16, epochs=3, val_size=200)
    online = build("tracin", target="val", target_loader=problem.val)
    classic = build("tracin_checkpoints", every=16, progress=False)
    model, recorder = _fit(problem, [online.callback(), classic.callback()])
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:60]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    for estimator in (online, classic):
        scores = estimator.scores(model, problem.train, problem.val)
        rho = spearman(torch.stack([scores[int(i)] for i in ids]), truth)
        print(f"{estimator.name}: spearman {rho:.3f}")
        assert rho > 0.3, (estimator.name, rho)


def test_bad_input(tmp_path):
    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=100)
    with pytest.raises(TypeError):
        build("tracin", target="val", windo=3)
    with pytest.raises(TypeError):
        build("tracin_checkpoints", evry=3)
    with pytest.raises(ValueError, match="target_every"):
        TracInCallback(target="val", target_loader=problem.val, target_every=0)
    with pytest.raises(ValueError, match="exactly one of every"):
        ParameterCheckpoints(every=2, count=3)
    with pytest.raises(ValueError, match="weighting"):
        TracInCheckpoints(weighting="sometimes")
    with pytest.raises(RuntimeError, match="run fit"):
        TracInCheckpoints(every=1).scores(Classifier().double(), problem.train, problem.val)
    # An empty checkpoint set.
    empty = RecordedCheckpoints([], (("net.0.weight",),), torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        TracInCheckpoints(checkpoints=empty).scores(Classifier().double(), problem.train, problem.val)
    # Checkpoints of another model.
    callback = ParameterCheckpoints(every=1, directory=tmp_path / "c")
    _fit(problem, [callback], hidden=(16,))
    with pytest.raises(ValueError, match="another model"):
        TracInCheckpoints(checkpoints=tmp_path / "c", progress=False).scores(
            Classifier(hidden=(8,)).double(), problem.train, problem.val
        )
    with pytest.raises(ValueError, match="does not have"):
        TracInCheckpoints(checkpoints=tmp_path / "c", progress=False).scores(
            Classifier(hidden=()).double(), problem.train, problem.val
        )
    # A damaged or incomplete directory.
    (tmp_path / "c" / "checkpoint-00000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFileError, match="truncated or corrupted"):
        list(RecordedCheckpoints.load(tmp_path / "c"))[1].parameters()
    (tmp_path / "c" / "checkpoint-00000002.pt").unlink()
    with pytest.raises(CheckpointFileError, match="lacks"):
        RecordedCheckpoints.load(tmp_path / "c")
    with pytest.raises(CheckpointFileError, match="no checkpoint directory"):
        RecordedCheckpoints.load(tmp_path / "nowhere")
    # Batches without sample ids are refused before training.
    from torch.utils.data import DataLoader, TensorDataset

    plain = DataLoader(TensorDataset(problem.x[:32], problem.y[:32]), batch_size=16)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="sample ids"):
        quiet_trainer(callbacks=[TracInCallback(target="val", target_loader=problem.val)]).fit(
            Classifier().double(), train_dataloaders=plain
        )


@pytest.mark.parametrize(
    "setting,expected",
    [
        ("sgd", None),
        ("adam", "Adam \\(its step is not the learning rate times the gradient\\)"),
        ("momentum", "SGD with momentum 0.9"),
        ("clip", "gradient clipping by norm at 0.05"),
    ],
)
def test_tracin_says_calibrated_false_and_why(tmp_path, setting, expected):
    """TracIn is the plain-SGD first-order view without the batch's re-averaging: never in the units
    of the retraining change (a deletion set's summed scores were 10x the change under plain SGD),
    and further off outside plain SGD without clipping (measured ~15x too small under Adam and ~10x
    too large with clipping). Its metadata (the callback's and TracInCP's, also over a checkpoint
    directory) says so, and why, as Forward-INF's does, which the deletion recipe reads."""
    from lightning_influence.recipes.deletion import in_target_loss_units

    problem = digits_problem(n=64, batch_size=16, epochs=2, val_size=100)
    online = build("tracin", target="val", target_loader=problem.val)
    recorded = build("tracin_checkpoints", every=2, directory=tmp_path / "c", progress=False)
    options = {"adam": dict(optimizer="adam"), "momentum": dict(optimizer_options={"momentum": 0.9})}.get(setting, {})
    torch.manual_seed(0)
    model = Classifier(hidden=(8,), lr=0.01 if setting == "adam" else 0.1, **options).double()
    trainer_options = {"gradient_clip_val": 0.05} if setting == "clip" else {}
    quiet_trainer(max_epochs=2, callbacks=[online.callback(), recorded.callback()], **trainer_options).fit(model, train_dataloaders=problem.train)
    one_epoch = type(problem.train)(problem.train.batches[:4])
    reloaded = TracInCheckpoints(checkpoints=tmp_path / "c", progress=False)
    for estimator in (online, recorded, reloaded):
        metadata = estimator.scores(model, one_epoch, problem.val).metadata
        assert metadata["calibrated"] is False and in_target_loss_units(metadata) is False
        assert "magnitude NOT calibrated: each step's term drops the sample's loss but keeps the batch's 1/b" in metadata["units"]
        if expected is None:
            assert "the run used" not in metadata["units"]
        else:
            assert re.search(f"and the run used {expected}", metadata["units"])


class RepeatingSampler(torch.utils.data.Sampler):
    """A custom sampler that puts sample 0 twice in the first batch (not recognisable as drawing with replacement)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([0, 0, *range(1, self.n - 1)])

    def __len__(self):
        return self.n


@pytest.mark.parametrize("recorder", ["tracin", "tracin_checkpoints"])
def test_samplers_that_repeat_a_sample_in_a_batch_are_refused_with_what_to_do(recorder):
    """TracIn and the parameter-checkpoint recorder count a sample once per step: a sampler drawing
    with replacement is refused at the first batch (before a duplicate shows up mid-training), and
    a repeat from an unrecognisable sampler is refused where it shows, saying what to do; neither
    message claims that the sampler is supported."""
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from lightning_influence import IndexedDataset

    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=100)
    dataset = IndexedDataset(TensorDataset(problem.x, problem.y))
    owner = "TracIn" if recorder == "tracin" else r"ParameterCheckpoints \(the recorder of tracin_checkpoints and diffin_checkpoints\)"
    advice = rf"{owner} does not support a training sampler that can repeat a sample within a batch .*draw without replacement .*or use DiffIn .*scores removing every copy"
    replacement = DataLoader(dataset, batch_size=8, sampler=RandomSampler(dataset, replacement=True, num_samples=64, generator=torch.Generator().manual_seed(0)))
    repeating = DataLoader(dataset, batch_size=8, sampler=RepeatingSampler(64))
    for loader, match in ((replacement, "sampler draws with replacement. " + advice), (repeating, r"duplicate sample ids in one batch: \[0\]. " + advice + ".*If the sampler draws each sample once per epoch, the ids are wrong")):
        estimator = build(recorder, target="val", target_loader=problem.val) if recorder == "tracin" else build(recorder)
        torch.manual_seed(0)
        with pytest.raises(ValueError, match=match) as refused:
            quiet_trainer(callbacks=[estimator.callback()]).fit(Classifier(hidden=(8,)).double(), train_dataloaders=loader)
        assert "DiffIn recognises and then scores" not in str(refused.value)
    # DiffIn takes the sampler drawing with replacement
    diffin = build("diffin", target="val", target_loader=problem.val)
    torch.manual_seed(0)
    quiet_trainer(callbacks=[diffin.callback()]).fit(Classifier(hidden=(8,)).double(), train_dataloaders=replacement)
    assert len(diffin.callback().scores) > 0


# ---------------------------------------------------------------------- README measurement
def measure(n: int = 1024, batch_size: int = 32, epochs: int = 8, hidden: tuple[int, ...] = (32,), samples: int = 120) -> None:
    """Spearman vs leave-one-out of online TracIn, TracInCP (one checkpoint per epoch) and the published
    Diff-In checkpoint estimator on the digits MLP, plain SGD lr 0.1 (the notes' setting)."""
    torch.set_num_threads(1)
    problem = digits_problem(n=n, batch_size=batch_size, epochs=epochs)
    estimators = {
        "tracin (online)": build("tracin", target="val", target_loader=problem.val),
        "tracin_checkpoints (every epoch)": build("tracin_checkpoints", every=n // batch_size, progress=False),
        "diffin_checkpoints (m=5)": build("diffin_checkpoints", progress=False),
    }
    start = time.perf_counter()
    model, recorder = _fit(problem, [e.callback() for e in estimators.values()], hidden=hidden)
    print(f"fit with all callbacks: {time.perf_counter() - start:.1f}s, {len(recorder.steps)} steps")
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:samples]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    for name, estimator in estimators.items():
        start = time.perf_counter()
        scores = estimator.scores(model, problem.train, problem.val)
        seconds = time.perf_counter() - start
        rho = spearman(torch.stack([scores[int(i)] for i in ids]), truth)
        print(f"{name:36s} spearman {rho:+.3f}  (scoring {seconds:.2f}s)")


if __name__ == "__main__":
    measure(hidden=() if "--logreg" in sys.argv else (32,))


def test_a_fit_that_takes_no_step_gives_empty_scores_and_says_so():
    """max_steps=0 skips the training loop (and its on_train_end): the fit still ends with empty
    scores on the callback and a warning; the module keeps the earlier fit's influence (an empty
    result never replaces scores)."""
    import warnings

    problem = digits_problem(n=32, batch_size=16, epochs=1, val_size=50)
    callback = TracInCallback(target="val", target_loader=problem.val)
    model, _ = _fit(problem, [callback])
    assert len(callback.scores) == 32 and model.influence is callback.scores
    earlier = model.influence
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[callback], max_steps=0).fit(model, train_dataloaders=problem.train)
    assert callback.scores is not None and len(callback.scores) == 0 and model.influence is earlier
    assert any("TracIn scored no sample: the fit took no optimizer step" in str(w.message) for w in caught)


class _SkipsBatches(Classifier):
    skip = (2, 5)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return None if batch_idx in self.skip else super().training_step(batch, batch_idx)


def test_batches_skipped_by_training_step_get_nothing():
    """training_step returning None leaves its batch out (no backward, no update): its samples score
    0 there, and the others score as in the run that never saw those batches."""
    from lightning_influence.data import FixedBatches

    problem = digits_problem(n=128, batch_size=16, epochs=1, val_size=50)
    batches = list(problem.train.batches)
    kept = [b for k, b in enumerate(batches) if k not in _SkipsBatches.skip]
    scores = []
    for cls, train in ((_SkipsBatches, batches), (Classifier, kept)):
        torch.manual_seed(0)
        model = cls(hidden=(16,), lr=0.1).double()
        callback = TracInCallback(target="val", target_loader=problem.val)
        quiet_trainer(callbacks=[callback]).fit(model, train_dataloaders=FixedBatches(train))
        scores.append(callback.scores)
    skipping, reference = scores
    skipped = torch.cat([batches[k][2] for k in _SkipsBatches.skip])
    assert all(float(skipping[int(i)]) == 0.0 for i in skipped) and skipping.metadata["steps_seen"] == len(kept)
    torch.testing.assert_close(torch.stack([skipping[int(i)] for i in reference.ids]), reference.values, rtol=0, atol=1e-15)


@pytest.mark.parametrize("owner", ["TracIn", "DiffIn"])
def test_ids_of_a_batch_left_out_after_the_first_step_are_checked(owner):
    """A batch that training_step leaves out, after the first step (whose ids are checked on the
    host at once), still has its ids checked: a negative id is refused, not marked seen."""
    from lightning_influence import DiffIn
    from lightning_influence.data import FixedBatches

    problem = digits_problem(n=96, batch_size=16, epochs=1, val_size=32)
    batches = [list(b) for b in problem.train.batches]
    batches[2][2] = batches[2][2] - 1000  # _SkipsBatches leaves batch 2 out
    torch.manual_seed(0)
    model = _SkipsBatches(hidden=(8,), lr=0.1).double()
    callback = TracInCallback(target="val", target_loader=problem.val) if owner == "TracIn" else DiffIn(target="val", target_loader=problem.val)
    with pytest.raises(ValueError, match=r"sample ids must be >= 0, got -"):
        quiet_trainer(callbacks=[callback]).fit(model, train_dataloaders=FixedBatches([tuple(b) for b in batches]))


class _LearningRateInModuleHook(Classifier):
    """Sets the learning rate in its own on_before_optimizer_step, which Lightning runs after every
    callback's: 0.2 on even steps, 0.02 on odd ones."""

    def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
        for group in optimizer.param_groups:
            group["lr"] = 0.2 if self.trainer.global_step % 2 == 0 else 0.02


def test_parameter_checkpoints_record_the_learning_rate_the_step_used():
    """ParameterCheckpoints read the rate in its own on_before_optimizer_step, before the module's
    hook changed it: the checkpoint estimators weighted every step with its neighbour's rate."""
    problem = digits_problem(n=96, batch_size=16, epochs=2)
    checkpoints = ParameterCheckpoints(every=1)
    _, recorder = _fit(problem, [checkpoints], model_class=_LearningRateInModuleHook)
    used = [step.lrs[0] for step in recorder.steps]
    assert used[:4] == [0.2, 0.02, 0.2, 0.02]
    assert checkpoints.record.step_lrs[:, 0].tolist() == used
    assert [c.lrs[0] for c in checkpoints.record.checkpoints] == used


@pytest.mark.parametrize("removal", ["drop", "reaverage"])
def test_one_tracin_step_is_the_first_order_change_of_retraining_with_its_batch_removal(removal):
    """One plain SGD step: TracIn's term is the first-order leave-one-out change for its counterfactual,
    so its error against leave_one_out(batch_removal=...) shrinks ~16x for a 4x smaller step; the
    other counterfactual's change differs by the step's offset. Only 'reaverage' says calibrated."""
    from lightning_influence.data import FixedBatches

    problem = digits_problem(n=64, batch_size=16, epochs=1, val_size=100)
    errors = []
    for lr in (0.04, 0.01):
        torch.manual_seed(0)
        model = Classifier(hidden=(8,), lr=lr).double()
        recorder = StepRecorder()
        callback = TracInCallback(target="val", target_loader=problem.val, batch_removal=removal)
        quiet_trainer(callbacks=[recorder, callback], max_steps=1).fit(model, train_dataloaders=FixedBatches(problem.train.batches[:1]))
        ids = problem.train.batches[0][2]
        args = (model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
        truth, other = leave_one_out(*args, batch_removal=removal), leave_one_out(*args, batch_removal="drop" if removal == "reaverage" else "reaverage")
        est = callback.scores.values_for(ids)
        errors.append(float((est - truth).abs().max()))
        if lr == 0.01:  # a second-order error, far below the other counterfactual's first-order offset
            assert errors[-1] < 0.1 * float((est - other).abs().max())
    assert errors[0] / errors[1] > 8  # second-order error: ~16x for a 4x smaller step
    assert callback.scores.metadata["calibrated"] is (removal == "reaverage") and callback.scores.metadata["batch_removal"] == removal
