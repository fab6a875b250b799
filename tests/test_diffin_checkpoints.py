"""The published Diff-In checkpoint estimator against a direct implementation with exact
(autograd double-backward) Hessian-vector products, and its sign against leave-one-out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from conftest import digits_problem, quiet_trainer  # noqa: E402
from lightning_influence.callbacks.checkpoints import ParameterCheckpoints, RecordedCheckpoints  # noqa: E402
from lightning_influence.estimators import build  # noqa: E402
from lightning_influence.estimators.diffin_checkpoints import DiffInCheckpoints  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, spearman  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402


def _fit(problem, callbacks, hidden=(8,)):
    torch.manual_seed(0)
    model = Classifier(hidden=hidden, lr=0.1).double()
    recorder = StepRecorder()
    quiet_trainer(callbacks=[recorder, *callbacks]).fit(model, train_dataloaders=problem.train)
    return model, recorder


def _direct(model, estimator, record, problem):
    """sum_t -t eta^2/(N m) <grad L_V, H_B grad l_z + H_z grad L_B> with exact products."""
    chosen = estimator.chosen(record)
    m, n = len(chosen), problem.n
    x_val = torch.cat([b[0] for b in problem.val])
    y_val = torch.cat([b[1] for b in problem.val])
    scores = torch.zeros(n, dtype=torch.float64)
    for index, checkpoint in enumerate(chosen):
        params = {k: v.clone().requires_grad_(True) for k, v in checkpoint.parameters().items()}
        leaves = list(params.values())

        def loss(x, y):
            return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        v = torch.autograd.grad(loss(x_val, y_val), leaves)
        xb, yb, _ = estimator._fixed_batch(model, problem.train, index)
        g_batch = torch.autograd.grad(loss(xb, yb), leaves, create_graph=True)
        g_batch_const = [g.detach() for g in g_batch]
        coefficient = -checkpoint.step * checkpoint.lrs[0] ** 2 / (n * m)
        for z in range(n):
            g_z = torch.autograd.grad(loss(problem.x[z : z + 1], problem.y[z : z + 1]), leaves, create_graph=True)
            h_b_gz = torch.autograd.grad(g_batch, leaves, grad_outputs=[g.detach() for g in g_z], retain_graph=True)
            h_z_gb = torch.autograd.grad(g_z, leaves, grad_outputs=g_batch_const)
            term = sum(float((a * (b + c)).sum()) for a, b, c in zip(v, h_b_gz, h_z_gb))
            scores[z] += coefficient * term
    return scores


def test_matches_exact_hessian_products_to_finite_difference_accuracy(tmp_path):
    problem = digits_problem(n=64, batch_size=16, epochs=3, val_size=100)
    published = DiffInCheckpoints(progress=False, directory=tmp_path / "ckpt")  # m=5 random checkpoints, eps=1e-3
    model, recorder = _fit(problem, [published.callback()])
    record = RecordedCheckpoints.load(tmp_path / "ckpt")
    assert len(record) == 5 and record.total_steps == len(recorder.steps) == 12
    scores = published.scores(model, problem.train, problem.val)
    fine = DiffInCheckpoints(checkpoints=record, eps=1e-6, progress=False).scores(model, problem.train, problem.val)
    want = _direct(model, published, record, problem)
    assert torch.equal(scores.ids, torch.arange(problem.n))
    scale = float(want.abs().max())
    coarse_error = float((scores.values - want).abs().max()) / scale
    fine_error = float((fine.values - want).abs().max()) / scale
    print(f"relative error: eps=1e-3 {coarse_error:.2e}, eps=1e-6 {fine_error:.2e}")
    assert coarse_error < 1e-2  # forward differences: O(eps) error
    assert fine_error < 1e-4 and fine_error < coarse_error / 10  # and it shrinks with the step
    assert scores.metadata["checkpoints"] == 5 and scores.metadata["eps"] == 1e-3
    assert "as published" in str(scores.metadata["sign"])


def test_sign_against_leave_one_out_and_bad_input():
    problem = digits_problem(n=256, batch_size=16, epochs=3, val_size=200)
    estimator = build("diffin_checkpoints", progress=False)
    model, recorder = _fit(problem, [estimator.callback()], hidden=(16,))
    scores = estimator.scores(model, problem.train, problem.val)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:60]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    rho = spearman(torch.stack([scores[int(i)] for i in ids]), truth)
    print(f"published Diff-In checkpoint estimator: spearman {rho:+.3f} vs leave-one-out")
    # The published formula is the curvature correction alone (no first-order term): in the library's
    # sign it opposes the first-order effect, so it ranks samples against leave-one-out here (README).
    assert rho < 0
    # Bad input.
    with pytest.raises(TypeError):
        build("diffin_checkpoints", m=5)
    with pytest.raises(ValueError, match="eps"):
        DiffInCheckpoints(eps=0.0)
    with pytest.raises(ValueError, match="count"):
        DiffInCheckpoints(count=0)
    empty = RecordedCheckpoints([], (("net.0.weight",),), torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        DiffInCheckpoints(checkpoints=empty).scores(model, problem.train, problem.val)
    with pytest.raises(ValueError, match="another model"):
        DiffInCheckpoints(checkpoints=estimator.record(), progress=False).scores(
            Classifier(hidden=(8,)).double(), problem.train, problem.val
        )
    with pytest.raises(RuntimeError, match="run fit"):
        DiffInCheckpoints().scores(model, problem.train, problem.val)
    two_rates = estimator.record()
    two_rates.checkpoints[0].lrs = (0.1, 0.05)
    with pytest.raises(ValueError, match="one learning rate"):
        DiffInCheckpoints(checkpoints=two_rates, progress=False).scores(model, problem.train, problem.val)
    with pytest.raises(ValueError, match="exactly one of every"):
        ParameterCheckpoints()


def _flip_a_bit_in_a_tensor(path: Path) -> None:
    """Flip one bit of the first float64 of the first tensor member of a ``torch.save`` archive:
    the archive stays readable by torch, only the member's CRC-32 no longer matches."""
    import io
    import struct
    import zipfile

    raw = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(io.BytesIO(bytes(raw))).infolist() if "/data/" in i.filename and i.file_size >= 8)
    name_len, extra_len = struct.unpack("<HH", bytes(raw[info.header_offset + 26 : info.header_offset + 30]))
    raw[info.header_offset + 30 + name_len + extra_len + 7] ^= 0x10  # the exponent of the first value
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_file_is_refused_not_loaded_with_changed_values(tmp_path):
    """torch.load does not check the zip members' CRC-32: a flipped bit in a stored parameter used
    to load as a changed value (and change the checkpoint estimators' scores silently)."""
    from lightning_influence.callbacks.checkpoints import CheckpointFileError

    problem = digits_problem(n=64, batch_size=16, epochs=1)
    _fit(problem, [ParameterCheckpoints(every=2, directory=tmp_path / "c")])
    loaded = RecordedCheckpoints.load(tmp_path / "c")
    assert [c.parameters() is not None for c in loaded] == [True] * len(list(loaded))
    _flip_a_bit_in_a_tensor(tmp_path / "c" / "checkpoint-00000002.pt")
    with pytest.raises(CheckpointFileError, match=r"checkpoint-00000002.pt is corrupted: zip member .*data/.* is damaged"):
        [c.parameters() for c in RecordedCheckpoints.load(tmp_path / "c")]
    _flip_a_bit_in_a_tensor(tmp_path / "c" / "steps.pt")
    with pytest.raises(CheckpointFileError, match=r"steps.pt is corrupted"):
        RecordedCheckpoints.load(tmp_path / "c")
