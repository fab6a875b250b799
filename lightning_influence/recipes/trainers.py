"""The Trainers of a recipe: each fit (the trial, the scoring run, every retraining) gets a fresh
Trainer from ``cfg.trainer`` with fresh instances of the user's callbacks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["make_trainer", "quiet_lightning", "runs_in_this_process", "user_callbacks", "world_size_of"]


def user_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Fresh instances of the ``callbacks`` group: a mapping ``name -> _target_ node`` (or a list)."""
    node = cfg.get("callbacks")
    if node is None:
        return []
    items = list(node.values()) if isinstance(node, DictConfig) else list(node) if isinstance(node, ListConfig) else None
    if items is None:
        raise TypeError(f"callbacks must be a mapping or a list of _target_ nodes, got {type(node).__name__}")
    result = []
    for item in items:
        if item is None:
            continue
        callback = instantiate(item)
        if not isinstance(callback, L.Callback):
            raise TypeError(f"callbacks entry {OmegaConf.to_yaml(item).strip()!r} gave a {type(callback).__name__}, not a lightning Callback")
        result.append(callback)
    return result


def make_trainer(cfg: DictConfig, out: Path, extra: Sequence[L.Callback] = (), overrides: dict[str, Any] | None = None) -> L.Trainer:
    """A fresh Trainer from ``cfg.trainer`` (with ``overrides``) with the user's callbacks plus
    ``extra``; ``default_root_dir`` is ``out`` unless the config sets it."""
    kwargs: dict[str, Any] = {"callbacks": [*user_callbacks(cfg), *extra], **(overrides or {})}
    if cfg.trainer.get("default_root_dir") is None:
        kwargs["default_root_dir"] = str(out)
    return instantiate(cfg.trainer, **kwargs)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer info lines (devices, tips, "fit stopped") off for the many
    retraining runs; warnings still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def runs_in_this_process(trainer: L.Trainer) -> bool:
    """Did this process run the fit itself (one device, or DDP re-running the script), so that the
    Trainer's step count is the fit's? Under spawn launchers the workers ran it."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is None:
        return True
    try:
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    except ImportError:  # pragma: no cover - lightning moved it: skip the check
        return False
    return isinstance(launcher, _SubprocessScriptLauncher)


def world_size_of(cfg: DictConfig) -> int:
    """The number of processes the configured Trainer trains with (``trainer.world_size``: devices
    x nodes, ``devices=auto`` resolved), from a Trainer built here and never run: no process is
    started, no callback or logger is made, nothing trains, and torch's determinism flags are left
    as they are (``deterministic=None``)."""
    with quiet_lightning():
        trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False, default_root_dir=None, deterministic=None)
    return max(int(getattr(trainer, "world_size", 1) or 1), 1)
