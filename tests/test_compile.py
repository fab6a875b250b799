"""``torch.compile``: a LightningModule compiled as a whole is scored through its original forward
(the same scores as eager); a compiled submodule, which forward-mode AD cannot go through, is
differentiated in reverse mode instead (the same scores, slower), with a warning that says how to
avoid it."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import quiet_trainer
from lightning_influence import DiffIn
from lightning_influence.models import Classifier

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")


class Unlogged(Classifier):
    """Classifier without self.log in training_step (dynamo cannot trace Lightning's log call)."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.per_sample_loss(batch).mean()


def scores(small_digits, compile_whole: bool = False, compile_net: bool = False):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Unlogged(hidden=(8,), lr=0.1).double()
    if compile_net:
        model.net = torch.compile(model.net)
    # Forward-mode per-sample derivatives: exact, so the comparison sees the compiled trajectory's
    # rounding (~1e-16) and not the 1 / eps amplification of finite differences of the losses.
    cb = DiffIn(target="val", target_loader=small_digits.val, per_sample="forward_mode")
    quiet_trainer(callbacks=[cb]).fit(torch.compile(model) if compile_whole else model, train_dataloaders=small_digits.train)
    return cb.scores


def test_a_compiled_lightning_module_gives_the_eager_scores(small_digits):
    eager = scores(small_digits)
    compiled = scores(small_digits, compile_whole=True)
    torch.testing.assert_close(compiled.values, eager.values, rtol=1e-6, atol=1e-9 * float(eager.values.abs().max()))


def test_a_compiled_submodule_gives_the_eager_scores_through_reverse_mode_with_advice(small_digits):
    eager = scores(small_digits)
    with pytest.warns(RuntimeWarning, match="compile the LightningModule as a whole"):
        compiled = scores(small_digits, compile_net=True)
    torch.testing.assert_close(compiled.values, eager.values, rtol=1e-6, atol=1e-9 * float(eager.values.abs().max()))
