"""What a resumed fit must share with the checkpointed one: the recording callbacks (DiffIn,
TracIn) save their fit's setup with their state and refuse, at the first resumed batch, a resume
whose setup differs, naming each difference (their recorded steps and score sums belong to the
checkpointed run; mixing two setups would give scores of neither)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_influence.estimators.base import batch_fingerprint
from lightning_influence.targets import TargetGradient

FINGERPRINT_MODULUS = 2**61 - 1
"""A prime: the target data's fingerprint is a polynomial hash of its tensors' fingerprints modulo it."""


def parameter_signature(named: Sequence[tuple[str, Tensor]]) -> list[list[Any]]:
    """``[name, shape, dtype]`` of each parameter, as primitives a checkpoint can hold."""
    return [[name, list(p.shape), str(p.dtype).removeprefix("torch.")] for name, p in named]


def setup_signature(trainer: L.Trainer, trained: Sequence[tuple[str, Tensor]], options: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    """The setup a callback's recorded steps and score sums depend on, as primitives: the
    precision, the trained parameters (names, shapes, dtypes), gradient clipping and
    accumulation, the callback's ``options`` that shape the scores, and ``more`` entries of the
    caller's (e.g. the optimizer's class and state)."""
    value = trainer.gradient_clip_val
    algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
    # the clipping that runs: none for a value of None or <= 0 (Lightning's), else by norm (its default) or value
    clipping = f"by {algorithm} at {float(value)!r}" if value is not None and float(value) > 0 else "none"
    return {
        "precision": str(trainer.precision),
        "parameters": parameter_signature(trained),
        "gradient clipping": clipping,
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "options": dict(options),
        **more,
    }


def target_fingerprint(target: TargetGradient) -> str:
    """An exact fingerprint of the target's data: every tensor of every target batch, in the order
    the target reads them (integer hashes of their bits: equal data gives equal fingerprints on
    any device; other data another one except with probability ~1e-9). One read of the target."""
    digest, count = 0, 0
    for batch in target.batches():
        for leaf in batch_fingerprint(batch, torch.zeros(0, dtype=torch.long)):
            digest = (digest * 1_000_003 + leaf.whole) % FINGERPRINT_MODULUS
            count += 1
    return f"{count} tensors, fingerprint {digest:016x}"


def target_signature(target: TargetGradient | None, source: Callable[[], Any] | None) -> dict[str, Any]:
    """``{"target data": fingerprint}`` of a callback's target, or ``{}`` where none is taken: no
    target yet, the training-loss target (whose data the training run checks), or a one-pass
    iterator (a read would use it up)."""
    if target is None or target.kind == "train" or source is None or isinstance(source(), Iterator):
        return {}
    return {"target data": target_fingerprint(target)}


def check_same_setup(owner: str, saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """Refuse a resume whose setup ``now`` differs from the checkpoint's ``saved`` one, naming each
    difference. ``saved`` empty or ``None``: a checkpoint written before any fit, or before
    setups were saved; nothing to compare."""
    if not saved:
        return
    changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    if not changed:
        return
    lines: list[str] = []
    for key in changed:
        before, after = saved.get(key), now.get(key)
        if key.endswith("parameters") and isinstance(before, list) and isinstance(after, list):
            then, current = {p[0]: p[1:] for p in before}, {p[0]: p[1:] for p in after}
            lines += [f"{key[:-1]} {n!r} trained then, not now" for n in then if n not in current]
            lines += [f"{key[:-1]} {n!r} trained now, not then" for n in current if n not in then]
            lines += [f"{key[:-1]} {n!r}: shape and dtype {then[n]} then, {current[n]} now" for n in then if n in current and then[n] != current[n]]
        elif isinstance(before, Mapping) and isinstance(after, Mapping):
            lines += [f"{key} {k}: {before.get(k)!r} then, {after.get(k)!r} now" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        else:
            lines.append(f"{key}: {before!r} then, {after!r} now")
    raise ValueError(
        f"{owner}: this fit resumes from a checkpoint of a run set up differently (" + "; ".join(lines) + "). The "
        f"recorded steps and the score sums in the checkpoint belong to that run (its precision, trained parameters, "
        f"optimizer, target and {owner} options), so the resumed fit would mix two setups in one set of scores. Resume "
        "with the setup the checkpoint was written with (Lightning restores the optimizer's hyperparameters from it in "
        "any case), or start a new fit"
    )
