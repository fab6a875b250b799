"""Input checks of the ``DiffIn`` callback: what it refuses before any training time is spent,
each with what is wrong and how to fix it (sample ids, per-sample losses, training and target
data, the memory a query target needs)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_influence.mixin import InfluenceMixin
from lightning_influence.optimizers import UnsupportedOptimizer, torch_optimizer
from lightning_influence.targets import TARGET_KINDS, FitStartLoader, TargetGradient, in_order
from lightning_influence.validation import check_count

if TYPE_CHECKING:
    from lightning_influence.callbacks.diffin import DiffIn

def check_ids(
    ids: Tensor, num_samples: int | None = None, module: Any = None, batch: Any = None, repeats: bool = False, owner: str = "DiffIn"
) -> None:
    """The sample ids of one training batch: a 1-D integer tensor of ids in ``[0, num_samples)``
    (``num_samples``: the training dataset's length when known; otherwise the score store grows),
    distinct unless the loader draws with replacement (``repeats``). ``owner``: the callback that
    reads them (only DiffIn scores a sample repeated in a batch)."""
    check_id_type(ids, module, batch)
    check_id_values(ids, num_samples, module, batch, repeats, owner)


def check_id_type(ids: Tensor, module: Any = None, batch: Any = None) -> None:
    """The part of :func:`check_ids` that reads no value: a 1-D integer tensor."""
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"sample_ids(batch) must return an integer Tensor[B] of sample ids, got dtype {ids.dtype} and shape "
            f"{tuple(ids.shape)}: {_ids_hint(module, batch)}"
        )


def check_id_values(
    ids: Tensor, num_samples: int | None = None, module: Any = None, batch: Any = None, repeats: bool = False, owner: str = "DiffIn"
) -> None:
    """The part of :func:`check_ids` that reads the values (on the host for ids on the host)."""
    if not ids.numel():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0:
        where = f"[0, {num_samples})" if num_samples is not None else "[0, N)"
        raise ValueError(
            f"sample ids must be >= 0, got {low}: ids are positions {where} in the training dataset and index the "
            f"score store. {_ids_hint(module, batch)}"
        )
    if num_samples is not None and high >= num_samples:
        first = int(ids[ids >= num_samples].min())
        raise ValueError(
            f"sample id {first} is outside [0, {num_samples}): ids must be positions in the training dataset "
            f"(len(trainer.train_dataloader.dataset) = {num_samples}), which sizes the score store. Wrap the training "
            "dataset itself in lightning_influence.IndexedDataset (not a larger dataset that is then subset or "
            "filtered), or override sample_ids(batch) to map your ids to 0..N-1 (1-based ids: subtract 1)"
        )
    if num_samples is None:
        store = (high + 1) * STORE_BYTES_PER_ID  # the score store is indexed by id
        if store > _memory_budget():
            raise ValueError(
                f"sample id {high} would size the score store at {high + 1} entries ({_format_bytes(store)}), beyond the "
                f"memory budget of {_format_bytes(_memory_budget())} ({MEMORY_BUDGET_ENV}): the training data has no "
                "length, and ids index the store, so they must be dense positions 0..N-1 (not row numbers of a larger "
                "table, hashes or timestamps). Map them to positions in sample_ids(batch), give the dataset a __len__, "
                f"or raise {MEMORY_BUDGET_ENV}=<bytes> if the data really has that many samples. {_ids_hint(module, batch)}"
            )
    if not repeats and ids.unique().numel() != ids.numel():
        dup = ids[torch.cat([ids.sort().values.diff() == 0, torch.tensor([False], device=ids.device)])]
        if owner == "DiffIn":
            raise ValueError(
                f"duplicate sample ids in one batch: {dup.unique().tolist()[:10]}; a sample appears at most once per "
                "step unless the training loader's sampler draws with replacement (RandomSampler(replacement=True), "
                f"WeightedRandomSampler), which DiffIn recognises and then scores removing every copy. {_ids_hint(module, batch)}"
            )
        raise ValueError(
            f"duplicate sample ids in one batch: {dup.unique().tolist()[:10]}. {repeats_unsupported(owner)} If the "
            f"sampler draws each sample once per epoch, the ids are wrong: {_ids_hint(module, batch)}"
        )


def repeats_unsupported(owner: str) -> str:
    """Why ``owner`` (a callback other than DiffIn) refuses a sampler that repeats a sample in a batch, and what to do."""
    return (
        f"{owner} does not support a training sampler that can repeat a sample within a batch (a sampler drawing with "
        "replacement: RandomSampler(replacement=True), WeightedRandomSampler): draw without replacement "
        "(DataLoader(shuffle=True), or RandomSampler(replacement=False)), or use DiffIn (the DiffIn callback, "
        "build('diffin')), which recognises such samplers and scores removing every copy of a sample."
    )


def draws_with_replacement(trainer: L.Trainer) -> bool:
    """True if the training loader's sampler may repeat a sample within a batch (a sampler with
    ``replacement=True``, as ``WeightedRandomSampler`` by default), also inside Lightning's
    distributed wrapper."""
    loader = trainer.train_dataloader
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    for _ in range(4):  # DistributedSamplerWrapper -> _DatasetSamplerWrapper -> the user's sampler
        if sampler is None:
            return False
        if getattr(sampler, "replacement", False) is True:
            return True
        sampler = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return False


def check_losses(
    losses: Any,
    ids: Tensor,
    device: torch.device | None = None,
    requires_grad: bool = False,
    owner: str = "DiffIn",
    batch: Any = None,
    module: Any = None,
) -> None:
    """The per-sample losses of the first training batch (computed with autograd on): one floating value
    per sample id, on the parameters' ``device``, differentiable when ``requires_grad``, finite.
    ``owner``: the callback or estimator named in the messages. With the ``batch`` (and its
    ``module``), one loss per sample of the batch but another number of ids blames ``sample_ids``."""
    samples = batch_length(batch) if batch is not None else None
    if (
        isinstance(losses, Tensor)
        and losses.dim() == 1
        and samples is not None
        and losses.shape[0] == samples != ids.numel()
    ):
        raise ValueError(
            f"sample_ids(batch) returned {ids.numel()} ids for a batch of {samples} samples (per_sample_loss(batch) "
            f"returned {samples} losses, one per sample): {owner} needs one id per sample, in the order of the batch's "
            f"samples. {_ids_hint(module, batch)}"
        )
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != ids.numel():
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"per_sample_loss(batch) must return an unreduced Tensor[B] with B = {ids.numel()} (one loss per sample "
            f"id), got {shape}: compute the loss without reduction (e.g. F.cross_entropy(logits, y, reduction='none'))"
        )
    if not losses.is_floating_point():
        raise ValueError(
            f"per_sample_loss(batch) must return floating-point losses, got dtype {losses.dtype}: return the unreduced "
            "training loss of each sample (e.g. F.cross_entropy(logits, y, reduction='none')), not labels, predictions "
            "or counts"
        )
    if device is not None and losses.device != device:
        raise ValueError(
            f"per_sample_loss(batch) returned losses on {losses.device} but the module's parameters are on {device}: "
            "compute them from the batch as given (Lightning has moved it to the module's device) and do not move "
            "the result (.cpu(), .to(...))"
        )
    if requires_grad and not losses.requires_grad:
        raise ValueError(
            "per_sample_loss(batch) returned losses that do not depend on the trainable parameters (requires_grad is "
            f"False): {owner} differentiates them, so compute them with autograd from the module's forward pass, "
            "without .detach(), .item(), NumPy or torch.no_grad()"
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = ids.reshape(-1).cpu()[~finite.cpu()]
        raise ValueError(
            f"per_sample_loss(batch) returned non-finite values for sample ids {bad[:10].tolist()}"
            f"{' ...' if bad.numel() > 10 else ''} on the first batch: check these samples for NaN/inf inputs and the "
            f"loss for log(0) or division by zero ({owner} cannot score with losses that are not finite)"
        )


def _ids_hint(module: Any, batch: Any) -> str:
    """Where the ids came from and how to provide them, for the messages of ``check_ids``."""
    if module is not None and type(module).sample_ids is not InfluenceMixin.sample_ids:
        return (
            f"{type(module).__name__}.sample_ids(batch) must return one distinct integer id per sample of the batch: "
            "its position in the training dataset"
        )
    if isinstance(batch, (tuple, list)):
        return (
            f"The default sample_ids(batch) read the last element of this {len(batch)}-element {type(batch).__name__} "
            "batch as the ids; if the batches carry no ids (an (x, y) batch: the labels or targets were read), wrap "
            "the training dataset in lightning_influence.IndexedDataset (each item then carries its index as its last "
            "element) or override sample_ids(batch)"
        )
    return (
        "If the batches carry no ids, wrap the training dataset in lightning_influence.IndexedDataset (each item then "
        "carries its index) or override sample_ids(batch)"
    )


def check_training_dataset(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """The trainer's training loader passes :func:`check_dataset_ids`."""
    check_dataset_ids(trainer.train_dataloader, pl_module)


def check_dataset_ids(loader: Any, pl_module: L.LightningModule) -> None:
    """A ``TensorDataset`` read by the default ``sample_ids``: its last tensor must be a column of
    distinct integer ids, else its batches carry none and the labels would be taken for ids."""
    if getattr(type(pl_module), "sample_ids", None) is not InfluenceMixin.sample_ids:
        return  # ids of the module's own making (or no mixin: refused where the ids are read)
    dataset = getattr(loader, "dataset", None)
    if not isinstance(dataset, TensorDataset) or not dataset.tensors:
        return
    last = dataset.tensors[-1]
    integer = not (last.is_floating_point() or last.is_complex() or last.dtype == torch.bool)
    if last.dim() == 1 and integer and last.unique().numel() == last.numel():
        return
    raise ValueError(
        f"the training dataset is a TensorDataset of {len(dataset.tensors)} tensors whose last one ({last.dtype}, shape "
        f"{tuple(last.shape)}) is not a column of sample ids (distinct integers): its batches carry no sample ids, and "
        "the default sample_ids(batch) would read that tensor (the labels or targets?) as ids. Wrap it, "
        "DataLoader(lightning_influence.IndexedDataset(dataset), ...), add an id column "
        "(TensorDataset(..., torch.arange(len(dataset)))), or override sample_ids(batch)"
    )


def batch_length(batch: Any) -> int | None:
    """Number of samples in a target batch; ``None`` when it holds no tensor with a batch dimension."""
    try:
        return TargetGradient._batch_size(batch)
    except ValueError:
        return None


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
            size = batch_length(batch)
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
    size = batch_length(batch)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or (size is not None and losses.shape[0] != size):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{owner}(target={callback.target!r}): per_sample_loss returned {shape} on a batch of {size} samples of the "
            f"{which}; the target needs one loss per sample, Tensor[B]"
        )


MEMORY_BUDGET_ENV = "LIGHTNING_INFLUENCE_MEMORY_BUDGET"
DEFAULT_MEMORY_BUDGET = 8 * 2**30


STORE_BYTES_PER_ID = 9
"""Bytes of score store per sample id: a float64 sum and a seen flag (per query column: 8 more)."""


def _memory_budget() -> float:
    """Bytes a query target may use: ``$LIGHTNING_INFLUENCE_MEMORY_BUDGET``, 8 GiB by default."""
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_MEMORY_BUDGET
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ValueError(f"{MEMORY_BUDGET_ENV} must be a number of bytes, got {raw!r} (e.g. {MEMORY_BUDGET_ENV}=17179869184)")
    return value


def _format_bytes(count: float) -> str:
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


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


def dataset_length(trainer: L.Trainer) -> int | None:
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def check_single_device(trainer: L.Trainer, owner: str) -> None:
    """Refuse distributed strategies in callbacks whose records are per process (only ``DiffIn``
    reduces its accumulators across ranks): a per-rank record would silently miss the samples
    the other ranks trained on."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise ValueError(
            f"{owner} does not support strategy {type(trainer.strategy).__name__}: it records what one process sees, "
            "and under a distributed strategy each rank sees only its shard of every batch. Train on one device "
            "(strategy='auto', devices=1), or use DiffIn, which reduces its scores across ranks"
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
            if batch_length(batch) == 0:
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


def check_influence_aware(pl_module: L.LightningModule) -> None:
    """The module declares per-sample losses and sample ids (:class:`~lightning_influence.InfluenceMixin`)."""
    if not isinstance(pl_module, InfluenceMixin):
        raise TypeError(
            f"{type(pl_module).__name__} is not influence-aware: add lightning_influence.InfluenceMixin to its "
            "bases and implement per_sample_loss(batch) -> Tensor[B] (and sample_ids if batches are not "
            "IndexedDataset tuples/dicts)"
        )


def mid_accumulation_resume_error(owner: str) -> ValueError:
    """The refusal to resume from a checkpoint saved between the micro-batches of one optimizer step."""
    return ValueError(
        "this checkpoint was saved in the middle of a gradient accumulation (between the micro-batches of one "
        "optimizer step, e.g. at a validation with val_check_interval not a multiple of accumulate_grad_batches), "
        f"whose partial gradient no checkpoint holds: {owner} cannot resume from it. Resume from a checkpoint saved "
        "at an optimizer-step boundary (ModelCheckpoint(every_n_train_steps=...)), or make val_check_interval a "
        "multiple of accumulate_grad_batches"
    )


#: Summed change of the other samples' losses, relative to their mean magnitude, above which a
#: batch's losses count as coupled (InfoNCE over 1024 pairs: about 0.13; float rounding: ~1e-5).
COUPLING_TOLERANCE = 1e-3


def undeclared_coupling(module: Any, batch: Any) -> float | None:
    """For a module that does not declare ``coupled_batch_loss``: the summed change of the other
    samples' losses when one sample is taken out of ``batch`` (the first, then the last),
    relative to their mean magnitude, if above :data:`COUPLING_TOLERANCE` (in-batch negatives,
    statistics over the batch: each sample's loss depends on its batch); else ``None``. The
    sample is taken out by the module's own ``remove_from_batch`` where it overrides it, else by
    :func:`~lightning_influence.batches.select_samples` (per-sample tensors and lists of values).
    Evaluated in evaluation mode without autograd, in passes whose random state training's random
    stream does not see; ``None`` where it cannot tell: a batch of one sample, a loss
    that differs between two evaluations of the same batch from different random states (it
    draws random numbers), losses within 1e3 roundings of zero in their dtype, a removal that
    does not apply to the batch. A heuristic: a tensor of the batch that
    is shared by its samples but has as many rows as the batch has samples looks per-sample."""
    from lightning_influence.batches import select_samples
    from lightning_influence.kernels import evaluation_mode

    if getattr(module, "coupled_batch_loss", False):
        return None
    own_removal = type(module).remove_from_batch is not InfluenceMixin.remove_from_batch
    try:
        size = int(torch.as_tensor(module.sample_ids(batch)).numel())
        if size < 2:
            return None
        losses = seeded_losses(module, size)

        with evaluation_mode(module), torch.no_grad():
            full = losses(batch)
            # A loss that depends on the random state (sampled noise or latents) cannot be compared across batches.
            if not isinstance(full, Tensor) or tuple(full.shape) != (size,) or not torch.equal(full, losses(batch, 1)):
                return None
            resolution = torch.finfo(full.dtype).eps if full.is_floating_point() else 0.0
            full = full.detach().double()
            scale = float(full.abs().mean())
            if scale < 1e3 * resolution:  # losses near their dtype's rounding (a fit to 1e-8): nothing to compare
                return None
            largest = 0.0
            for removed in (0, size - 1):
                keep = [i for i in range(size) if i != removed]
                sub = module.remove_from_batch(batch, removed) if own_removal else select_samples(batch, keep, size)
                without = losses(sub)
                if not isinstance(without, Tensor) or tuple(without.shape) != (size - 1,):
                    return None
                largest = max(largest, float((without.detach().double() - full[keep]).abs().sum()))
    except Exception:  # noqa: BLE001 - a batch layout the removal does not handle: nothing to tell
        return None
    if not math.isfinite(largest) or not scale > 0.0 or largest <= COUPLING_TOLERANCE * scale:
        return None
    return largest / scale


def seeded_losses(module: Any, key: int) -> Callable[..., Any]:
    """``losses(batch, offset=0)``: ``module.per_sample_loss(batch)`` drawn from a random state fixed
    by ``key`` and ``offset`` (so two evaluations draw the same dropout masks and noise, or, with
    another offset, other ones), in a fork that training's random stream does not see."""
    device = getattr(module, "device", torch.device("cpu"))
    devices = [device] if isinstance(device, torch.device) and device.type == "cuda" else []
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(key)))

    def losses(batch: Any, offset: int = 0) -> Any:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + offset)
            return module.per_sample_loss(batch)

    return losses


def coupling_message(module: Any, change: float) -> str:
    """What :func:`undeclared_coupling` found, and what to do (a warning: the test is a heuristic)."""
    name = type(module).__name__
    return (
        f"{name}.per_sample_loss looks coupled across its batch but {name} does not declare coupled_batch_loss: taking "
        f"one sample out of the first training batch changed the other samples' losses by {change:.3g} times their "
        "mean loss in total (in-batch negatives as in contrastive/InfoNCE losses, or statistics over the batch). "
        "Removing a sample then also changes the others' losses, which the independent-loss formula misses (on a "
        "CLIP-like model of the project's tests: Spearman 0.88 against true leave-one-out, 0.96 when declared), and the ground truth retrains "
        f"with that formula too. If the loss is coupled, set coupled_batch_loss = True on {name}. If it is not (a "
        "tensor of the batch that all samples share but that has as many rows as the batch has samples), pass "
        "DiffIn(coupled=False), or override remove_from_batch to keep that tensor whole"
    )


def training_mode_losses(pl_module: L.LightningModule, batch: Any, then: Callable[[Tensor], None] | None = None) -> Tensor:
    """``per_sample_loss(batch)`` as ``training_step`` is about to compute it: in the module's mode,
    with autograd on and the random stream ``training_step`` will draw (forked: dropout masks agree
    and training's own draws are left alone), followed by ``then(losses)`` inside the same fork.
    Buffers (batch-norm running statistics) are restored: the check does not change the run."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    buffers = [b.detach().clone() for b in pl_module.buffers()]
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        losses = pl_module.per_sample_loss(batch)  # type: ignore[operator]
        if then is not None:
            then(losses)
    with torch.no_grad():
        for b, saved in zip(pl_module.buffers(), buffers):
            b.copy_(saved)
    return losses


def check_training_loss(outputs: Any, accumulate: int, losses: Tensor, *, mixed: bool, scale: float | None = None) -> bool:
    """The first step's check: ``training_step`` returned (in ``outputs``; Lightning divides it by
    ``accumulate`` micro-batches) the mean of the per-sample ``losses`` of its batch, to
    :func:`loss_tolerance` relative to the losses' mean magnitude ``scale`` (never absolute: losses
    of 1e-5 that differ 4-fold are a mismatch). Returns whether it compared: not when
    ``training_step`` returned no tensor (the batch was left out; check the next one)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if not isinstance(loss, Tensor):
        return False
    expected, got = float(loss.detach()) * accumulate, float(losses.detach().mean())
    scale = float(losses.detach().abs().mean()) if scale is None else scale
    tol = loss_tolerance(loss.dtype, losses.dtype, mixed=mixed)
    if not math.isclose(expected, got, rel_tol=tol, abs_tol=tol * scale):
        raise ValueError(
            f"per_sample_loss(batch).mean() = {got!r} but training_step returned loss {expected!r} on the first "
            "step: the per-sample losses must be the unreduced terms of the training loss (same reduction, "
            "same regularisers, no extra weighting). Random augmentation or masking must happen before "
            "training_step (in the dataset, the collate function or on_after_batch_transfer), so that "
            "per_sample_loss(batch) sees the batch training did"
        )
    return True


class FirstLossCheck:
    """The first step's :func:`check_training_loss`, for a callback that does not otherwise see the
    per-sample losses: :meth:`batch_start` takes them (:func:`training_mode_losses`) while the
    check is pending, :meth:`batch_end` compares them with what ``training_step`` returned. A batch
    that ``training_step`` leaves out (returns ``None``) moves the check on to the next one."""

    def __init__(self) -> None:
        self.pending = False
        self._losses: Tensor | None = None

    def reset(self) -> None:
        """A fit starts: check its first step."""
        self.pending, self._losses = True, None

    def batch_start(self, pl_module: L.LightningModule, batch: Any, losses: Tensor | None = None) -> None:
        """``losses``: the batch's per-sample losses if the caller already has them (from
        :func:`training_mode_losses`)."""
        if self.pending:
            self._losses = (losses if losses is not None else training_mode_losses(pl_module, batch)).detach()

    def batch_end(self, trainer: L.Trainer, outputs: Any) -> None:
        if self._losses is None:
            return
        losses, self._losses = self._losses, None
        mixed = str(trainer.precision) in ("bf16-mixed", "16-mixed")
        if check_training_loss(outputs, int(trainer.accumulate_grad_batches), losses, mixed=mixed):
            self.pending = False


def loss_tolerance(*dtypes: torch.dtype, mixed: bool = False) -> float:
    """Relative tolerance between two computations of one loss (``training_step``'s and the mean of
    ``per_sample_loss``, training and evaluation mode): ``2e-2`` under mixed precision (one side
    computed under autocast, the other not), else by the coarsest dtype: ``1e-2`` for bfloat16 (8
    significant bits: a mean rounds by up to ~4e-3), ``2e-3`` for float16 (11 bits, ~5e-4),
    ``1e-4`` for float32, ``1e-9`` when every value is float64."""
    if mixed:
        return 2e-2
    if torch.bfloat16 in dtypes:
        return 1e-2
    if torch.float16 in dtypes:
        return 2e-3
    return 1e-9 if all(d == torch.float64 for d in dtypes) else 1e-4


def check_trained_parameters(
    owner: str, names: Iterable[str], params: Iterable[Tensor], known: Iterable[Tensor], optimizer: Any, step: int
) -> None:
    """The parameters ``owner`` took as trained at fit start (``names``, ``params``) must keep
    training, and no other parameter of the optimizer (``known``: every one ``owner`` took at fit
    start, trained or kept as context) may start to: one frozen since (``requires_grad=False``) or
    one unfrozen since (it received a gradient: ``BackboneFinetuning`` adds the backbone to the
    optimizer as a new parameter group) is refused, naming it and ``step``. Reads no device value."""
    frozen = [name for name, p in zip(names, params, strict=True) if not p.requires_grad]
    seen = {id(p) for p in known}
    groups = torch_optimizer(optimizer, owner).param_groups
    thawed = [p for group in groups for p in group["params"] if id(p) not in seen and p.grad is not None]
    if not frozen and not thawed:
        return
    what = (
        f"parameter {frozen[0]!r} has been frozen (requires_grad=False)"
        if frozen
        else f"a parameter of shape {tuple(thawed[0].shape)} that was not trained at fit start (frozen, or left out of "
        "the optimizer) is trained now (it received a gradient: unfrozen, or added with add_param_group)"
    )
    raise ValueError(
        f"{what} since {owner} took the trainable parameters (its on_fit_start, before the module's), seen at "
        f"optimizer step {step}: {owner} cannot score steps in which the set of trained parameters changed "
        "(e.g. BackboneFinetuning, which unfreezes a backbone mid-fit and adds it to the optimizer). Freeze "
        "parameters before fit (or leave them out of the optimizer) and keep them frozen, or score each training "
        "phase with its own fit"
    )


class BackwardWatch:
    """Whether a backward pass has accumulated a gradient into any of the watched parameters since
    the last :meth:`arm`: Lightning runs none for a micro-batch whose ``training_step`` returned
    ``None`` (its way of leaving a batch out), which the micro-batch's step must then leave out
    too. Hooks on the parameters (``register_post_accumulate_grad_hook``), so the answer does not
    depend on which callback hooks a subclass overrides; no device read. Watches nothing (and
    reports every backward as run) until :meth:`watch`, and again after :meth:`close`."""

    def __init__(self) -> None:
        self.ran = True
        self._handles: list[Any] = []

    def watch(self, params: Iterable[Tensor]) -> None:
        """Watch ``params`` (the trainable ones), in place of any watched before."""
        self.close()
        self._handles = [p.register_post_accumulate_grad_hook(self._seen) for p in params if p.requires_grad]

    def _seen(self, param: Tensor) -> None:
        self.ran = True

    def arm(self) -> None:
        """A micro-batch starts: no backward has run for it yet."""
        self.ran = not self._handles

    def take_skipped(self, micro_batches: list[Any]) -> Any | None:
        """Pop and return the last of ``micro_batches`` (the one :meth:`arm` was called for) if no
        backward has run for it; ``None`` otherwise."""
        if self.ran or not micro_batches:
            return None
        self.ran = True
        return micro_batches.pop()

    def close(self) -> None:
        """Remove the hooks (a fit that ended or failed leaves none on the parameters)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.ran = True


class OptimizerStepWatch:
    """Calls ``on_step(optimizer)`` once per ``optimizer.step``, right before the torch optimizer
    updates the parameters: after ``on_before_optimizer_step`` of every callback and of the
    LightningModule, after gradient clipping, so the learning rates and other hyperparameters it
    reads are the ones the step uses, and the gradients the final ones. A step that the gradient
    scaler skips calls nothing. Watches nothing until :meth:`watch`, and again after :meth:`close`.

    How: a step pre-hook on the torch optimizer behind Lightning's wrapper. Lightning passes
    ``optimizer.step`` a closure that runs the step's last ``training_step``, its backward, the
    ``on_before_optimizer_step`` hooks and the clipping, and the torch optimizer calls that closure
    inside ``step``, after its pre-hooks (32-true, 64-true, bf16-mixed): the pre-hook then wraps the
    closure so that ``on_step`` runs when it returns. Without a closure (16-mixed: Lightning runs it
    first and the gradient scaler calls ``step()`` bare), ``on_step`` runs in the pre-hook itself.

    ``carries_state`` (an owner that models the optimizer's state as each step leaves it for the
    next: DiffIn, the retraining recorder): each step also checks that the optimizer's state is
    the one the previous step left, the same tensors unmodified (their version counters; no device
    read), and refuses a state cleared, replaced or edited in place in between (a "restart" that
    resets momentum), naming the step."""

    def __init__(self, on_step: Callable[[torch.optim.Optimizer], None], owner: str, *, carries_state: bool = False) -> None:
        self._on_step = on_step
        self._owner = owner
        self._carries_state = carries_state
        self._handles: list[Any] = []
        self._left: dict[int, dict[str, Any]] | None = None  # the state as the last step left it
        self._steps = 0

    def watch(self, optimizer: Any) -> None:
        """Watch ``optimizer`` (a ``LightningOptimizer`` or a torch optimizer), in place of any watched before."""
        self.close()
        inner = torch_optimizer(optimizer, self._owner)
        try:
            self._handles = [inner.register_step_pre_hook(self._pre_step)]
            if self._carries_state:
                self._handles.append(inner.register_step_post_hook(self._post_step))
        except AttributeError as err:  # a subclass whose __init__ skipped torch.optim.Optimizer.__init__
            self.close()
            raise UnsupportedOptimizer(
                f"{self._owner} reads every step through torch.optim.Optimizer's step hooks, which "
                f"{type(inner).__qualname__} does not have ({err}: its __init__ does not call "
                "torch.optim.Optimizer.__init__, as some optimizer wrappers do). Use the optimizer it wraps"
            ) from None

    def _step_starts(self, optimizer: torch.optim.Optimizer) -> None:
        if self._left is not None:
            self._check_state(optimizer)
        self._on_step(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._left = _state_marks(optimizer)
        self._steps += 1

    def _check_state(self, optimizer: torch.optim.Optimizer) -> None:
        now = _state_marks(optimizer)
        if now == self._left:
            return
        assert self._left is not None
        shapes = {id(p): tuple(p.shape) for group in optimizer.param_groups for p in group["params"]}
        what = "the state was cleared" if not now else "the state was replaced"
        for key in [] if not now else sorted(set(self._left) | set(now), key=lambda k: k not in now):
            before, after = self._left.get(key), now.get(key)
            if before == after:
                continue
            shape = shapes.get(key, "?")
            if after is None:
                what = f"the state of a parameter of shape {shape} was removed"
            elif before is None:
                what = f"a parameter of shape {shape} got state of its own"
            else:
                changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
                what = f"the state {changed} of a parameter of shape {shape} was replaced or changed in place"
            break
        raise ValueError(
            f"{self._owner}: the optimizer's state changed between optimizer steps {self._steps - 1} and {self._steps} "
            f"of this fit, outside optimizer.step ({what}: e.g. optimizer.state.clear() or momentum buffers reset "
            f"for a restart, or a state loaded mid-fit). {self._owner} takes the state each step starts from to be "
            "the one the previous step left, so every step before the change would be mis-scored. Keep the "
            "optimizer's state for the whole fit, or train each phase in a fit of its own (configure_optimizers "
            "builds a fresh optimizer for each fit)"
        )

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # torch passes the hook step's own arguments: (optimizer, closure?) and keyword arguments
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._step_starts(optimizer)
            return None

        def closure_then_step(*closure_args: Any, **closure_kwargs: Any) -> Any:
            result = closure(*closure_args, **closure_kwargs)
            self._step_starts(optimizer)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_step}
        return (args[0], closure_then_step, *args[2:]), kwargs

    def close(self) -> None:
        """Remove the hooks (a fit that ended or failed leaves none on the optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._left, self._steps = [], None, 0


def _state_marks(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """The optimizer's state, per parameter (by ``id``) and name, as marks that change when it
    changes: a tensor's identity and version counter (bumped by every in-place change), any other
    value itself. Host-only."""
    return {
        id(p): {name: (id(v), v._version) if isinstance(v, Tensor) else v for name, v in state.items()}
        for p, state in optimizer.state.items()
    }


def draws_each_sample_once(trainer: L.Trainer) -> str | None:
    """The name of the training loader's sampler if it is one that yields every sample of the
    dataset at most once per epoch (``SequentialSampler``, ``RandomSampler`` without replacement
    or a smaller ``num_samples``, a ``DistributedSampler`` of the dataset, behind a plain
    ``BatchSampler``); ``None`` for anything else (custom or weighted samplers, iterable datasets),
    whose repeats may be meant."""
    from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

    loader = trainer.train_dataloader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = loader.batch_sampler.sampler
    if type(sampler) is DistributedSampler:
        return "DistributedSampler"
    if type(sampler) is SequentialSampler:
        return "SequentialSampler"
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples <= len(sampler.data_source):  # type: ignore[arg-type]
        return "RandomSampler"
    wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's DistributedSamplerWrapper
    if wrapped is not None and type(wrapped) in (SequentialSampler, RandomSampler) and not getattr(wrapped, "replacement", False):
        return f"{type(wrapped).__name__} (distributed)"
    return None


class EpochRepeats:
    """Sample ids that come back within one epoch, counted on the device (one ``index_add`` per
    micro-batch, no host read) and read once at the epoch's end: with a sampler that yields each
    sample once an epoch (:func:`draws_each_sample_once`), a repeat means the ids are not
    positions in the training dataset (e.g. positions within the batch, ``0..b-1``), so that
    different samples would share one score; warned about once a fit. Ids outside
    ``[0, N)`` are left to the id checks."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._counts: Tensor | None = None
        self._sampler: str | None = None
        self._warned = False

    def reset(self) -> None:
        """A fit starts: warn again."""
        self._counts, self._warned = None, False

    def start(self, trainer: L.Trainer, device: torch.device) -> None:
        """An epoch starts: count its ids if its sampler yields each sample once."""
        self._sampler = draws_each_sample_once(trainer)
        size = dataset_length(trainer) if self._sampler is not None and not self._warned else None
        self._counts = torch.zeros(size, dtype=torch.int32, device=device) if size else None

    def add(self, ids: Tensor) -> None:
        if self._counts is None:
            return
        ids = ids.reshape(-1).to(self._counts.device, torch.long)
        size = self._counts.numel()
        inside = (ids >= 0) & (ids < size)
        self._counts.index_add_(0, ids.clamp(0, size - 1), inside.to(torch.int32))

    def end(self, epoch: int) -> None:
        """The epoch ends: read the count (one host read) and warn on a repeat, once a fit."""
        counts, self._counts = self._counts, None
        if counts is None:
            return
        repeats, distinct = int((counts - 1).clamp(min=0).sum()), int((counts > 0).sum())
        if repeats and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{self.owner}: {repeats} sample id(s) came back within epoch {epoch} ({distinct} distinct ids) although "
                f"the training sampler ({self._sampler}) yields each sample once an epoch: the ids are probably not "
                "positions in the training dataset (positions within the batch, 0..b-1, are the usual mistake), and then "
                "different samples share one score. sample_ids(batch) must return each sample's position in the "
                "training dataset (IndexedDataset adds it to every item). Warned once"
            )
