"""The target data of the recording callbacks (DiffIn, TracIn): where the target's batches come
from (the validation loader, the training set, a query loader), their checks, and the memory a
query target needs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_influence.checks import MEMORY_BUDGET_ENV, _format_bytes, _memory_budget, batch_length, dataset_length
from lightning_influence.distributed import Collective, distributed_shard
from lightning_influence.targets import TARGET_KINDS, FitStartLoader, TargetGradient, in_order
from lightning_influence.validation import check_count

if TYPE_CHECKING:
    from lightning_influence.callbacks.diffin import DiffIn


def empty_target_message(kind: str, explicit: bool, batches: int, owner: str = "DiffIn") -> str:
    which = "target_loader" if explicit else "training loader" if kind == "train" else "validation loader"
    found = f"{batches} batches" if batches == 0 else f"{batches} batch{'es' if batches > 1 else ''}, all empty"
    loss = "has one column per sample" if kind == "query" else "is the mean over its samples"
    return (
        f"{owner}(target={kind!r}): the {which} yielded no samples ({found}); the target loss {loss} and is undefined "
        "without any. Pass a loader with at least one non-empty batch (check the dataset's length, drop_last=True "
        "with fewer samples than batch_size, and filters that remove every sample)"
    )


def check_target_data(callback: DiffIn, trainer: L.Trainer) -> None:
    """At the first training batch, before training time is spent: the target loader yields samples
    (one non-empty batch is looked for), and a query target (all its batches are counted) fits the
    memory budget. A one-pass iterator is left alone (it is consumed by the target gradient), and so is
    the training loader (being iterated)."""
    source = callback._target_source
    if callback.target == "train":
        check_readable_training_set(trainer, type(callback).__name__)
    if callback.target == "train" or source is None:
        return
    loader = source()
    if isinstance(loader, Iterator):
        return
    query = callback.target == "query"
    batches = samples = 0
    sizes_known, evaluated = True, False
    with untouched_random_state(loader, trainer.strategy.root_device):  # a shuffling loader draws
        for batch in loader:
            batches += 1
            size = batch_length(batch, getattr(trainer.lightning_module, "sample_ids", None))
            if size is None:
                sizes_known = False
            else:
                samples += size
            if size != 0 and not evaluated:
                evaluated = True
                check_target_losses(trainer, batch, callback)
            if not query and size != 0:
                break
    if samples == 0 and sizes_known:
        raise ValueError(empty_target_message(callback.target, callback.target_loader is not None, batches, type(callback).__name__))
    if not query or not sizes_known:
        return
    if callback.target_samples is not None and callback.target_samples > samples:
        raise ValueError(
            f"target_samples={callback.target_samples} exceeds the {samples} samples of the query target loader: "
            "lower target_samples or pass more queries"
        )
    space, model = callback._space, callback._model
    if space is None:
        return
    vectors = 1 + len(getattr(model, "state_names", ())) + (callback.hessian_every > 1)
    check_query_budget(
        space.size,
        samples if callback.target_samples is None else callback.target_samples,
        dataset_length(trainer),
        dtype=torch.promote_types(space.dtype, torch.float32),
        adjoint_vectors=vectors,
    )


def check_target_losses(trainer: L.Trainer, batch: Any, callback: Any) -> None:
    """``per_sample_loss`` of one target batch (on the module's device, evaluation mode, no
    gradient) must be a ``Tensor[B]``: a target loader whose batches the loss cannot read (say,
    ``(x, y)`` batches where training's are ``(x, y, ids)``) is refused before training, naming
    the loader, instead of failing in the first sweep."""
    from lightning_influence.kernels import evaluation_mode

    owner = type(callback).__name__
    which = "target_loader" if callback.target_loader is not None else "validation loader"
    pl_module = trainer.lightning_module
    try:
        device_batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))  # as the target's batches
        with evaluation_mode(pl_module), torch.no_grad():
            losses = pl_module.per_sample_loss(device_batch)  # type: ignore[operator]
    except Exception as error:
        raise ValueError(
            f"{owner}(target={callback.target!r}): per_sample_loss fails on the first batch of the {which} "
            f"({type(error).__name__}: {error}). Its batches must have the structure of the training batches that "
            "per_sample_loss reads (e.g. (x, y, ids): wrap the dataset in lightning_influence.IndexedDataset too)"
        ) from error
    size = batch_length(batch, pl_module.sample_ids)  # type: ignore[arg-type]
    if not isinstance(losses, Tensor) or losses.dim() != 1 or (size is not None and losses.shape[0] != size):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{owner}(target={callback.target!r}): per_sample_loss returned {shape} on a batch of {size} samples of the "
            f"{which}; the target needs one loss per sample, Tensor[B]"
        )


def check_query_budget(
    P: int, Q: int, N: int | None, budget: float | None = None, *, dtype: torch.dtype = torch.float32, adjoint_vectors: int = 1
) -> None:
    """Refuse a query target whose P x Q matrices and N x Q scores would not fit ``budget`` bytes
    (default: :func:`_memory_budget`). Estimate: the target gradient (P x Q, float64), the propagated
    adjoint (P x Q in ``dtype``, times ``adjoint_vectors`` with optimizer-state adjoints) and the scores
    (N x Q, float64; not counted when the number of training samples ``N`` is unknown)."""
    budget = _memory_budget() if budget is None else budget
    gradient = P * Q * 8
    adjoint = P * Q * dtype.itemsize * adjoint_vectors
    scores = (N or 0) * Q * 8
    need = gradient + adjoint + scores
    if need <= budget:
        return
    state = f", {adjoint_vectors} such matrices with the optimizer state" if adjoint_vectors > 1 else ""
    raise ValueError(
        f"target='query' with Q={Q} query samples needs about {_format_bytes(need)}: the target gradient and the "
        f"propagated adjoint are P x Q = {P} x {Q} matrices (gradient {_format_bytes(gradient)} in float64, adjoint "
        f"{_format_bytes(adjoint)} in {str(dtype).removeprefix('torch.')}{state}) and the scores an "
        f"N x Q = {N if N is not None else '(unknown)'} x {Q} "
        f"float64 matrix ({_format_bytes(scores)}); this exceeds the memory budget of {_format_bytes(budget)} "
        f"({MEMORY_BUDGET_ENV}). Score fewer queries (target_samples=k, or a smaller target_loader), attribute through "
        f"a parameter subset (params=['head.*']) to shrink P, use target='val' for one aggregate score per sample, or "
        f"raise {MEMORY_BUDGET_ENV}=<bytes> if the machine has the memory"
    )


def target_loader_source(trainer: L.Trainer, kind: str, target_loader: Iterable[Any] | None, owner: str) -> Callable[[], Iterable[Any]]:
    """A function returning the loader of a callback's target, resolved when called (Lightning sets
    its loaders up after ``on_fit_start``): ``target_loader`` when given, else the trainer's training
    loader (``"train"``) or its validation loader (``"val"``) as of the first call, kept for the whole
    fit (:class:`~lightning_influence.targets.FitStartLoader`: a reloaded one is warned about, once). Call
    it once per fit. Refuses a ``"val"`` target without
    any validation loader at once, and with several (which one is the target?) when resolved."""
    val_source = trainer.fit_loop.epoch_loop.val_loop._data_source
    if kind == "val" and target_loader is None and not val_source.is_defined():
        raise ValueError(
            "target='val' needs a validation loader: pass val_dataloaders to Trainer.fit, define "
            f"val_dataloader() in the module or datamodule, or give {owner}(target_loader=...)"
        )

    # The trainer's validation loader as of the first read in this fit, for the whole fit (a reload is warned about).
    val_loader = FitStartLoader(lambda: trainer.val_dataloaders, val_source.dataloader, owner)

    def source() -> Iterable[Any]:
        if target_loader is not None:
            return in_order(target_loader) if kind != "train" else target_loader
        if kind == "train":
            loader = trainer.train_dataloader
            loader = loader if loader is not None else trainer.fit_loop._data_source.dataloader()
            return training_set_loader(loader, trainer)
        loader = val_loader()
        if isinstance(loader, (list, tuple, Mapping)):  # Lightning's form of several validation loaders
            loaders = list(loader.values()) if isinstance(loader, Mapping) else list(loader)
            if len(loaders) != 1:
                raise ValueError(
                    f"target='val' found {len(loaders)} validation loaders on the trainer; {owner} scores against one "
                    f"target loss. Pass the loader to score against as {owner}(target_loader=...) (for several loaders' "
                    "samples together, a list of their batches)"
                )
            loader = loaders[0]
        return in_order(loader)

    return source


_END = object()


def _world_size(trainer: L.Trainer) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def check_readable_training_set(trainer: L.Trainer, owner: str) -> None:
    """``target="train"`` reads the training set again, in order (at the end of fit; online, at every
    sweep): refused for a stream (an ``IterableDataset``), which may never end (the read would hang)
    and whose reading may move what training sees next."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"{owner}(target='train') reads the training set again to compute its mean loss (at the end of fit, and at "
            f"every sweep online), but the training data is a stream ({type(dataset).__name__}, an IterableDataset): it "
            "may never end, and reading it may change what training sees next. Give the training samples as a finite "
            f"loader instead: {owner}(target='val', target_loader=DataLoader(<the training samples>, ...)) scores "
            "against their mean loss, the same target"
        )


def training_set_loader(loader: Any, trainer: L.Trainer) -> Iterable[Any]:
    """The loader of ``target="train"``: every training sample once, in order
    (:func:`~lightning_influence.targets.in_order` with ``always``): a sampler drawing with
    replacement would weigh a random draw of the samples, and ``drop_last`` with shuffling a random
    subset, differently at every target pass. Under DDP the in-order read is sharded over the ranks,
    whose target gradients are reduced: the same target as in one process."""
    return in_order(loader, world_size=_world_size(trainer), rank=int(getattr(trainer, "global_rank", 0) or 0), always=True)


@contextlib.contextmanager
def untouched_random_state(loader: Any, device: torch.device) -> Iterator[None]:
    """Iterate ``loader`` without moving any random stream training draws from: the global
    generators (forked) and the loader's own (``DataLoader(generator=...)``, a sampler's
    ``generator``), whose states are put back."""
    owned = []
    for holder in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g, _ in owned):
            owned.append((generator, generator.get_state()))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for generator, state in owned:
            generator.set_state(state)


def device_target_batches(
    source: Callable[[], Iterable[Any]], trainer: L.Trainer, kind: str, explicit: bool, owner: str
) -> Callable[[], Iterator[Any]]:
    """The non-empty batches of ``source()`` moved to the training device and converted by the
    precision plugin (e.g. to float64 under ``precision="64-true"``), as Lightning's loops do; a
    loader that yields no sample raises :func:`empty_target_message` (the target loss is
    undefined without any). The loader draws from a fork of the random generators: a shuffling
    loader (the training loader of ``target="train"``) leaves the training run's stream as it was."""
    strategy = trainer.strategy
    device = strategy.root_device

    def batches() -> Iterator[Any]:
        seen = 0
        found = False
        loader = source()
        resumable = not isinstance(loader, DataLoader) and callable(getattr(loader, "state_dict", None))
        state = loader.state_dict() if resumable else None
        with untouched_random_state(loader, device):
            iterator = iter(loader)
        while True:
            with untouched_random_state(loader, device):
                batch = next(iterator, _END)
            if batch is _END:
                break
            seen += 1
            if batch_length(batch, getattr(trainer.lightning_module, "sample_ids", None)) == 0:
                continue  # adds nothing to the target, and per_sample_loss may fail on it
            found = True
            yield trainer.precision_plugin.convert_input(strategy.batch_to_device(batch))
        if not found:
            raise ValueError(empty_target_message(kind, explicit, seen, owner))
        if resumable and loader.state_dict() != state:
            raise ValueError(
                f"{owner}(target={kind!r}): reading the target moved the state of its loader ({type(loader).__name__}: "
                f"state_dict() {state!r} before, {loader.state_dict()!r} after). Lightning saves that state to resume "
                "mid-epoch, so a checkpoint would resume at the wrong batch. Give the target a loader of its own "
                "(for target='train': target='val' with target_loader=<another loader over the training samples>)"
            )

    return batches


def check_target_arguments(target: str, target_loader: Iterable[Any] | None, target_samples: int | None) -> None:
    """Validate a callback's target arguments at construction (shared by the influence callbacks)."""
    if target not in TARGET_KINDS:
        raise ValueError(f"target must be one of {TARGET_KINDS}, got {target!r}")
    if target == "query" and target_loader is None:
        raise ValueError("target='query' needs target_loader=<loader of the query samples>")
    if target == "train" and target_loader is not None:
        raise ValueError("target='train' uses the training loader; target_loader is for 'val' or 'query'")
    check_count("target_samples", target_samples, none_ok=True)


def target_gradient(
    owner: str,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    kind: str,
    target_loader: Iterable[Any] | None,
    sample_count: int | None,
    seed: int,
    collective: Collective | None = None,
) -> tuple[Callable[[], Iterable[Any]], TargetGradient]:
    """The target of a recording callback (``owner``, named in messages): the source of its batches
    and its :class:`~lightning_influence.targets.TargetGradient`, whose batches are resolved lazily
    (Lightning sets up its loaders after ``on_fit_start``). With a ``collective``, each rank
    evaluates its shard of the target and the gradients are summed across ranks."""
    source = target_loader_source(trainer, kind, target_loader, owner)
    batches = device_target_batches(source, trainer, kind, target_loader is not None, owner)
    shared: dict[str, Any] = {} if collective is None else {"collective": collective, "shard": lambda: distributed_shard(source())}
    gradient = TargetGradient(
        kind,  # type: ignore[arg-type]
        batches,
        sample_count=sample_count,
        seed=seed,
        sample_ids=pl_module.sample_ids if kind == "train" else None,  # type: ignore[operator]
        batch_ids=pl_module.sample_ids,  # type: ignore[arg-type]
        **shared,
    )
    return source, gradient
