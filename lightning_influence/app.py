"""The main job: ``python -m lightning_influence [overrides]`` runs the selected recipe
(``recipe=cleaning`` by default; ``deletion``, ``coreset``) end to end and writes
``scores.pt``, ``scores.csv``, ``report.json``, ``config.yaml`` and PNG plots into the Hydra run
directory. Call :func:`run` with a composed config to do the same in-process (``output_dir``
must then be set).

Before anything is set up or trained, and before its start line, :func:`run` checks the config
(:func:`lightning_influence.recipes.check_recipe`: :func:`lightning_influence.config.check_config`,
then the selected recipe's own settings; a refusal is a
:class:`~lightning_influence.config.ConfigError`, which the command line prints without a
traceback). :func:`~lightning_influence.config.check_config` checks the values of every ``_target_`` node against
its constructor's signature, the model's sizes against the data, the recipe's keys and
out-of-range values, an ``output_dir`` that every job of a multirun would share). What the run prints (the
run's summary, the recipe's tables, where the outputs went) and the warnings it raises are also
written to the log files of the logging configuration, i.e. Hydra's job log
``<run dir>/lightning-influence.log``; a failure is logged there with its traceback.

Sign and units: a score is the predicted change of the target loss (by default the mean
validation cross-entropy, in nats) when the sample is removed from training. Positive: the
sample helps. Negative: it hurts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from omegaconf import DictConfig

from lightning_influence.config import refused_config
from lightning_influence.recipes import check_recipe, run_recipe
from lightning_influence.distributed import is_global_zero
from lightning_influence.recipes.outputs import end_run, fail_run, make_output_dir, output_dir

__all__ = ["run", "output_dir", "run_log", "describe_run", "RUN_LOGGER"]

#: The logger that copies a run's console output and warnings to the log files (not to the console).
RUN_LOGGER = "lightning_influence.run"


class _LoggingTee:
    """A text stream that writes through to ``stream`` and logs each complete non-blank line to ``log``."""

    def __init__(self, stream: TextIO, log: logging.Logger) -> None:
        self._stream, self._log, self._pending = stream, log, ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._log.info(line.rstrip())
        return written

    def flush(self) -> None:
        if self._pending.strip():
            self._log.info(self._pending.rstrip())
        self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def run_log() -> Iterator[logging.Logger]:
    """During the block, copy what is printed to stdout (INFO, line by line) and the warnings
    shown (WARNING) to the log files of the current logging configuration: the ``FileHandler``\\ s
    of the root logger, under Hydra its job log ``<run dir>/<job name>.log``. The console output
    is left as it is; the copies go to those files only (:data:`RUN_LOGGER` does not propagate).
    Loggers that bypass the root logger's handlers with their own (Lightning's, which print its
    info lines) log to those files too. Yields :data:`RUN_LOGGER`, for lines meant for the log
    file alone. Without a log file: no copies."""
    log = logging.getLogger(RUN_LOGGER)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    bypassing = [
        lg for lg in list(logging.Logger.manager.loggerDict.values())
        if isinstance(lg, logging.Logger) and lg is not log and not lg.propagate and lg.handlers
    ]
    attached = [(lg, h) for lg in (log, *bypassing) for h in files if h not in lg.handlers] or [(log, logging.NullHandler())]
    propagate = log.propagate
    log.propagate = False
    for logger, handler in attached:
        logger.addHandler(handler)
    stdout, show = sys.stdout, warnings.showwarning

    def show_and_log(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None, line: str | None = None
    ) -> None:
        show(message, category, filename, lineno, file, line)
        log.warning("%s: %s", category.__name__, message)

    tee = _LoggingTee(stdout, log)
    if files:
        sys.stdout = tee  # type: ignore[assignment]
        warnings.showwarning = show_and_log
    try:
        yield log
    finally:
        if files:
            tee.flush()
            if sys.stdout is tee:  # else someone replaced it meanwhile: theirs stays
                sys.stdout = stdout
            if warnings.showwarning is show_and_log:
                warnings.showwarning = show
        for logger, handler in attached:
            logger.removeHandler(handler)
        log.propagate = propagate


def describe_run(cfg: DictConfig) -> str:
    """One line on what runs: the config group choices and the command-line overrides under Hydra
    (else the recipe and estimator names) and the seed."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        runtime = HydraConfig.get()
        picked = runtime.runtime.choices.items()
        choices = [f"{group}={choice}" for group, choice in picked if choice is not None and not group.startswith("hydra/")]
        overrides = list(runtime.overrides.task)
    else:
        recipe, estimator = cfg.get("recipe"), cfg.get("estimator")
        choices = [f"{key}={node.get('name')}" for key, node in (("recipe", recipe), ("estimator", estimator)) if node is not None]
        overrides = []
    return " ".join(choices) + (f"; overrides: {' '.join(overrides)}" if overrides else "") + f"; seed={cfg.get('seed')}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check the config (before anything is set up or trained), run the recipe it selects
    (``cfg.recipe.name``) and return its report. Global rank zero prints a summary line first and
    where the outputs went last; the run's console output also goes to the log file (:func:`run_log`).
    An output folder that cannot be created is refused before the start line. When the run fails,
    its job marker says so and a warning names the recipe outputs of an earlier run still in its
    output folder: they are not this run's (:func:`lightning_influence.recipes.outputs.fail_run`)."""
    with run_log() as log:

        def say(line: str) -> None:
            """Rank zero prints (and so logs); the other ranks of a distributed run log to their own file only."""
            if is_global_zero():
                print(line, flush=True)
            else:
                log.info(line)

        out: Path | None = None
        try:
            try:
                check_recipe(cfg)
            except (ValueError, TypeError) as err:
                raise refused_config(err) from err
            out = output_dir(cfg)
            if is_global_zero():
                make_output_dir(out)  # a folder that cannot be created: refused before the start line
            say(f"lightning-influence: {describe_run(cfg)}; outputs in {out}")
            report = run_recipe(cfg)
        except Exception as err:
            log.error("the run failed: %s: %s", type(err).__name__, err, exc_info=True)
            if out is None:  # refused by check_config: its folder's earlier outputs are not this run's either
                with contextlib.suppress(Exception):
                    out = output_dir(cfg)
            if out is not None:
                try:
                    fail_run(out, err)  # the folder's outputs of an earlier run are not this run's: say so
                except Exception as note:  # noqa: BLE001 - the run's own error is what the user needs
                    log.warning("could not mark %s as failed: %s: %s", out, type(note).__name__, note)
            raise
        finally:
            if out is not None:
                end_run(out)
        files = report.get("files") if isinstance(report, dict) else None
        say(f"Outputs in {out}" + (f": {', '.join(map(str, files.values()))}" if isinstance(files, dict) and files else ""))
    return report
