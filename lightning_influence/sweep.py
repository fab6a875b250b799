"""Check every job of a Hydra multirun before the first one trains.

``python -m lightning_influence -m data.seed=0,1,-1`` composes and runs one job at a time; each
job checks its own config when it starts (:func:`lightning_influence.config.check_config`), so
without this a bad value in the last job of a sweep is found only after the others trained.
:class:`CheckEveryJobFirst` (a Hydra callback, registered in ``conf/config.yaml`` under
``hydra.callbacks``) composes every job's config when the multirun starts, as Hydra's basic
sweeper will, runs the checks that need the config alone on each (those of
:func:`lightning_influence.recipes.check_recipe`: the config's, then the recipe's own), and
refuses the whole sweep, naming each failing job by its number and overrides, before any job
runs. Two jobs whose outputs would go to one folder (``output_dir``, or the Hydra job folder
where it is ``null``) are refused too (each would write its files over the other's). Checks that
need the data or the model (the model's sizes against the data's, a metric the model logs) still
run when each job starts. The log line says how long the checks took (about 0.3 s per job
on a 2-core machine).

Sweeps by other sweepers (Optuna, Ax, ...) choose their jobs' values while they run: their jobs
are left to check themselves when they start. A user's own Hydra app that composes the library's
configs (``hydra.searchpath``) runs its own task: its sweeps are not checked here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lightning_influence.recipes import check_recipe


__all__ = ["CheckEveryJobFirst", "job_overrides", "check_sweep"]

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
#: Failing jobs named in full in the error; the rest are counted.
MAX_NAMED = 5

try:  # Hydra is a dependency; the base class only adds no-op hooks.
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override lists of the jobs the basic sweeper will run for ``config`` (the multirun's
    composed config, with its ``hydra`` node), in its order; ``None`` for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.get("sweeper")
    if sweeper is None or sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return [list(job) for job in BasicSweeper.split_arguments(parsed, None)[0]]


def runs_the_library_app(config: DictConfig) -> bool:
    """Is the primary config the library's own (``python -m lightning_influence``)? A user's Hydra app
    that composes the library's configs (``hydra.searchpath``) runs its own task, which these
    checks do not describe."""
    sources = OmegaConf.select(config, "hydra.runtime.config_sources", default=None) or []
    return any(src.get("provider") == "main" and src.get("path") == "lightning_influence.conf" for src in sources)


def _job_config(config: DictConfig, overrides: list[str], num: int) -> DictConfig:
    """Job ``num``'s config as the basic launcher composes it (``hydra`` node included)."""
    from hydra.core.global_hydra import GlobalHydra

    job = GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
    with open_dict(job):
        job.hydra.job.id = num
        job.hydra.job.num = num
    sweep_dir = str(OmegaConf.select(job, "hydra.sweep.dir"))
    subdir = str(OmegaConf.select(job, "hydra.sweep.subdir"))
    with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
        job.hydra.runtime.output_dir = str(Path(sweep_dir, subdir).absolute())
    return job


def check_sweep(config: DictConfig) -> int:
    """Compose and check every job of the multirun ``config`` (see the module docstring); returns
    the number of jobs checked (0 for a sweeper whose jobs are not known in advance). Raises
    ``ValueError`` naming each failing job's number and overrides and what is wrong."""
    from hydra.core.hydra_config import HydraConfig

    if not runs_the_library_app(config):
        log.info("the multirun's primary config is not lightning_influence.conf's: its jobs are its app's to check")
        return 0
    jobs = job_overrides(config)
    if jobs is None:
        log.info("the sweeper %s picks its jobs while it runs: each job checks its own config", config.hydra.sweeper.get("_target_"))
        return 0
    failures: list[str] = []
    folders: dict[Path, int] = {}
    previous = HydraConfig.instance().cfg
    try:
        for num, overrides in enumerate(jobs):
            where = f"job {num} ({' '.join(overrides) or 'no overrides'})"
            try:
                job = _job_config(config, overrides, num)
                HydraConfig.instance().set_config(job)  # for ${hydra:...} and the multirun checks
                task = OmegaConf.masked_copy(job, [k for k in job.keys() if k != "hydra"])
                with contextlib.redirect_stdout(io.StringIO()):  # the recipes' notes belong to their own runs
                    check_recipe(task)
                explicit = task.get("output_dir")
                job_dir = Path(str(job.hydra.runtime.output_dir)).resolve()
                folder = Path(str(explicit)).expanduser().resolve() if explicit is not None else job_dir
                if folder in folders:
                    what = "output_dir" if explicit is not None else "the job folder (hydra.sweep.dir/hydra.sweep.subdir)"
                    raise ValueError(
                        f"{what} resolves to {folder}, the output folder of job {folders[folder]} too: each would "
                        "write its outputs over the other's. Give each job its own folder: output_dir=null with the "
                        "default hydra.sweep.subdir (the job number), or a path that differs between the jobs, e.g. "
                        "with ${hydra:job.num}"
                    )
                folders[folder] = num
            except Exception as err:  # every failing job is named, not only the first
                failures.append(f"{where}: {type(err).__name__}: {err}")
    finally:
        if previous is not None:
            HydraConfig.instance().set_config(previous)
    if failures:
        named = "\n".join(f"  - {line}" for line in failures[:MAX_NAMED])
        more = f"\n  ... and {len(failures) - MAX_NAMED} more" if len(failures) > MAX_NAMED else ""
        raise ValueError(
            f"{len(failures)} of the {len(jobs)} jobs of this multirun have a config that would be refused when the "
            f"job starts; no job was run. Fix the sweep's values:\n{named}{more}"
        )
    return len(jobs)


class CheckEveryJobFirst(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback: :func:`check_sweep` when a multirun starts, before its first job. A sweep
    with failing jobs ends the process with exit status 1 and the error on stderr (Hydra turns
    a callback's ``Exception`` into a warning and goes on, so it is raised as ``SystemExit``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            checked = check_sweep(config)
        except ValueError as err:
            raise SystemExit(f"Error: {err}") from err
        if checked:
            log.info("checked the configs of all %d jobs of the multirun in %.1f s", checked, time.perf_counter() - start)
