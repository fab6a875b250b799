"""The training steps of a DiffIn (or TracIn) fit read nothing back from the device once its first, verified
steps are done: the sample ids and the gradients' finiteness travel to the host by non-blocking
copies and are checked one step later (``DiffIn._settle``). Audited by provenance on the CPU
(``host_reads.HostReadAudit``): a read there is a synchronisation on a GPU."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from host_reads import HostReadAudit, as_device
from lightning_influence import DiffIn, IndexedDataset
from lightning_influence.callbacks import TracIn
from lightning_influence.callbacks.diffin import VERIFIED_STEPS
from lightning_influence.data import load_digits_tensors
from lightning_influence.host import HostCopy
from lightning_influence.models import Classifier

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
STEADY = 4 * 8 * VERIFIED_STEPS
"""Steps after which a fit is in its steady state (the verified steps lie at the first checkpoints)."""


def _audited_fit(callback: L.Callback, model: L.LightningModule, steps: int, **trainer_kwargs) -> tuple[HostReadAudit, list[int]]:
    """Fit with the audit on; count the library's reads in the callback's training hooks of the
    steady-state steps that run no sweep. Returns the audit and the audited steps."""
    x, y = load_digits_tensors(torch.float32)
    train = DataLoader(IndexedDataset(TensorDataset(x[:512], y[:512])), batch_size=16, shuffle=True)
    val = DataLoader(IndexedDataset(TensorDataset(x[512:640], y[512:640])), batch_size=64)
    audit, audited = HostReadAudit(), []
    state = {"step": 0}

    for hook in HOOKS:
        original = getattr(callback, hook)

        def wrapped(trainer, pl_module, *args, _original=original, _hook=hook):
            as_device([*args, list(pl_module.parameters()), list(pl_module.buffers())])
            sweeps, before = getattr(callback, "truncated_sweeps", 0), audit.sites.copy()
            audit.counting = state["step"] >= STEADY
            try:
                return _original(trainer, pl_module, *args)
            finally:
                audit.counting = False
                if _hook == "on_train_batch_end":
                    if getattr(callback, "truncated_sweeps", 0) != sweeps:  # a sweep's reads are not a training step's
                        audit.sites = before
                    elif state["step"] >= STEADY:
                        audited.append(state["step"])
                    state["step"] += 1

        setattr(callback, hook, wrapped)
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=steps, max_epochs=-1, callbacks=[callback], **trainer_kwargs)
    with audit:
        trainer.fit(model, train, val)
    assert callback.scores is not None and len(callback.scores) > 0
    return audit, audited


@pytest.mark.parametrize(
    "case",
    ["replay", "online", "adam", "accumulation", "tracin"],
)
def test_steady_state_training_steps_read_nothing_from_the_device(case):
    options = {"online": dict(mode="online", window=16, score_every=16)}.get(case, {})
    model = Classifier(hidden=(16,), lr=0.01, optimizer="adam") if case == "adam" else Classifier(hidden=(16,), lr=0.1)
    kwargs = {"accumulate_grad_batches": 2} if case == "accumulation" else {}
    steps = STEADY + 40
    callback = TracIn(target="val") if case == "tracin" else DiffIn(target="val", **options)
    audit, audited = _audited_fit(callback, model, steps, **kwargs)
    assert len(audited) >= 20
    assert not audit.sites, f"reads of device values in steady-state training steps: {dict(audit.sites)}"


def test_the_audit_sees_the_reads_it_is_meant_to_catch():
    """The audit itself: reads of device values from library code are recorded, host values and
    non-blocking copies are not."""
    audit = HostReadAudit()
    device_value = torch.arange(4.0)
    with audit:
        audit.counting = True
        copied = HostCopy([device_value.sum()]).wait()[0]
        assert float(copied) == 6.0  # a host copy: no read of the device
        host = torch.zeros(3)
        assert float(host.sum()) == 0.0
        from lightning_influence.kernels import all_finite

        assert all_finite(device_value)  # library code reading a device value
    assert sum(audit.sites.values()) >= 1 and all("kernels.py" in site for site in audit.sites)


@pytest.mark.parametrize("mode", ["replay", "online"])
def test_sweeps_read_a_few_device_values_per_sweep_not_per_product(mode):
    """What a sweep still reads: the propagated gradient's norm every 16 products and a few values
    per sweep (its start, the steps' norms, the recorded-gradient checks). The products' steps,
    the per-step score sums and the finiteness checks stay on the device."""
    x, y = load_digits_tensors(torch.float32)
    train = DataLoader(IndexedDataset(TensorDataset(x[:512], y[:512])), batch_size=16, shuffle=True)
    val = DataLoader(IndexedDataset(TensorDataset(x[512:640], y[512:640])), batch_size=64)
    callback = DiffIn(target="val", mode=mode, **({"window": 16, "score_every": 16} if mode == "online" else {}))
    audit, sweeps = HostReadAudit(), []
    original = callback._run_sweep

    def run_sweep(num_scored):
        as_device([list(callback._params)])
        sweeps.append(num_scored)
        audit.counting = True
        try:
            return original(num_scored)
        finally:
            audit.counting = False

    callback._run_sweep = run_sweep
    torch.manual_seed(0)
    with audit:
        quiet_trainer(max_steps=96, max_epochs=-1, callbacks=[callback]).fit(Classifier(hidden=(16,), lr=0.1), train, val)
    products = callback.scores.metadata["hessian_products"]
    reads = sum(audit.sites.values())
    assert not any("kernels.py" in site for site in audit.sites), dict(audit.sites)
    assert reads <= products / 16 + 16 * len(sweeps), dict(audit.sites)
