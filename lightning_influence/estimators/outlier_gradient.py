"""Outlier gradient analysis: harmful samples are outliers in per-sample gradient space.

Per-sample loss gradients at the final parameters, restricted by default to the parameters of
the last module that owns trainable parameters (the classifier head: cheap, and where
mislabelled samples stand out), are scored as outliers (Chhabra et al., 2024):

- ``"self_influence"`` (default): ``-||g_i||^2``, minus the first-order self-influence
  ``<grad l_i, grad l_i>`` (TracIn's self-influence at the final checkpoint, per unit of
  learning rate). Units: squared loss-gradient norm.
- ``"norm"``: ``-||g_i||_2``. Units: loss-gradient norm.
- ``"isolation_forest"``: scikit-learn's ``IsolationForest(...).fit(G).score_samples(G)``, the
  opposite of its anomaly score, in ``[-1, 0]`` (dimensionless). Needs scikit-learn (an
  optional extra: ``pip install scikit-learn``); ``detector_options`` go to the constructor.

Sign: outliers are harmful, so a **lower score is more suspicious**, like a harmful sample under
the library's influence convention; the values are not removal influences (see the metadata's
``"units"``). ``target`` is ignored: these scores depend on the training samples alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor

from lightning_influence.estimators.base import Estimator, Target, attributed_space, posthoc_training
from lightning_influence.estimators.coreset import per_sample_values, ranking_convention
from lightning_influence.kernels import per_sample_gradients
from lightning_influence.scores import InfluenceScores
from lightning_influence.solvers import check_embeddings
from lightning_influence.validation import check_count, check_seed

__all__ = ["OutlierGradient", "last_module_parameters"]

METHODS = ("self_influence", "norm", "isolation_forest")


def last_module_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters of the last submodule (in registration order) that owns
    trainable parameters directly: the output layer of a sequential network."""
    last: list[str] = []
    for prefix, sub in module.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if own:
            last = own
    if not last:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to take gradients of")
    return last


def _isolation_forest() -> type:
    try:
        from sklearn.ensemble import IsolationForest
    except ImportError as err:
        raise ImportError(
            "method='isolation_forest' needs scikit-learn: pip install scikit-learn "
            "(or use method='self_influence' or 'norm', which need nothing extra)"
        ) from err
    return IsolationForest


class OutlierGradient(Estimator):
    """Outlier scores of per-sample gradients (see the module docstring for methods, units, sign).

    ``params``: fnmatch patterns of the parameters whose gradients are used (default: the last
    module with trainable parameters, :func:`last_module_parameters`). ``chunk_size``: samples
    vectorised at once. ``seed``: the isolation forest's ``random_state``.
    """

    name: ClassVar[str] = "outlier_gradient"
    predicts_removal: ClassVar[bool] = False

    def __init__(
        self,
        method: str = "self_influence",
        params: Sequence[str] | None = None,
        chunk_size: int | None = 64,
        detector_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_count("chunk_size", chunk_size, none_ok=True)
        if detector_options and method != "isolation_forest":
            raise ValueError(f"detector_options only apply to method='isolation_forest', not {method!r}")
        if method == "isolation_forest":
            detector = _isolation_forest()
            try:
                detector(random_state=seed, **dict(detector_options or {}))
            except TypeError as err:
                raise ValueError(f"bad detector_options for IsolationForest: {err}") from err
        self.method = method
        self.params = list(params) if params else None
        self.chunk_size = chunk_size
        self.detector_options = dict(detector_options or {})
        check_seed("seed", seed)
        self.seed = seed
        self.progress = progress

    def check_module(self, module: torch.nn.Module, batch: Any = None) -> None:
        """Also refuse an attributed embedding with ``sparse=True`` (its gradient is a sparse tensor)."""
        super().check_module(module)
        check_embeddings(module, attributed_space(module, self.params or last_module_parameters(module))[0].names, f"estimator {self.name!r}")

    def scores(self, module: L.LightningModule, train_loader: Iterable[Any], target: Target | str | Iterable[Any] = "train") -> InfluenceScores:
        train_loader = posthoc_training(module, train_loader, f"estimator {self.name!r}", alone=True)  # differentiable losses, before any work
        patterns = self.params or last_module_parameters(module)
        space, theta, loss_fn = attributed_space(module, patterns)
        check_embeddings(module, space.names, f"estimator {self.name!r}")  # before any gradient

        def features(batch: Any) -> Tensor:
            grads = per_sample_gradients(loss_fn, space, theta, batch, chunk_size=self.chunk_size).double()
            if self.method == "isolation_forest":
                return grads
            squared = grads.pow(2).sum(dim=1)
            return -squared if self.method == "self_influence" else -squared.sqrt()

        ids, values = per_sample_values(
            module, train_loader, features, description="outlier gradients", show_progress=self.progress, no_grad=False,
            finite="loss gradient", owner=f"estimator {self.name!r}",
        )
        if not bool(values.ne(0).any()):
            chosen = "params" if self.params else "the default (the last module with trainable parameters, in registration order)"
            raise ValueError(
                f"outlier_gradient: the per-sample gradients of {list(space.names)} ({chosen}) are zero on every training sample, "
                "so every score would be 0: the loss does not use these parameters (an unused or auxiliary head?). Pass "
                "params=[...] naming the layer that computes the outputs, e.g. params=['head.*']"
            )
        if self.method == "isolation_forest":
            forest = _isolation_forest()(random_state=self.seed, **self.detector_options)
            matrix = values.numpy()
            values = torch.as_tensor(forest.fit(matrix).score_samples(matrix), dtype=torch.float64)
        units = {
            "self_influence": "minus the squared per-sample gradient norm <g_i, g_i> (first-order self-influence per unit learning rate)",
            "norm": "minus the per-sample gradient norm ||g_i|| (loss units per unit parameter)",
            "isolation_forest": "IsolationForest.score_samples of the per-sample gradients, in [-1, 0] (dimensionless)",
        }[self.method]
        higher = "more typical gradient; lowest = outlier = suspicious (harmful)"
        metadata = {
            "estimator": self.name,
            "target": "none",
            "method": self.method,
            "units": units,
            "higher_means": higher,
            "sign_convention": ranking_convention(higher),
            "calibrated": False,
            "parameters": space.size,
            "parameter_names": ",".join(space.names),
        }
        return InfluenceScores(ids, values, metadata)
