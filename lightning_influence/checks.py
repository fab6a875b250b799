"""Checks of the data contract (:class:`~lightning_influence.mixin.InfluenceMixin`) shared by the
callbacks, the post-hoc estimators and the retraining recorder: sample ids, per-sample losses and
their coupling, the loss ``training_step`` optimises, the training dataset. Each refusal says what
is wrong and how to fix it."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_influence.mixin import InfluenceMixin
from lightning_influence.optimizers import torch_optimizer
from lightning_influence.batches import samples_in


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
            f"(of length {num_samples}), which sizes the score store. Wrap the whole training dataset in "
            "lightning_influence.IndexedDataset and select from it with a sampler (SubsetRandomSampler) or "
            "torch.utils.data.Subset(IndexedDataset(data), indices): ids then stay positions in the whole dataset, also "
            "when the subset changes between epochs (not IndexedDataset(Subset(...)), whose ids are positions in the "
            "subset); or override sample_ids(batch) to map your ids to 0..N-1 (1-based ids: subtract 1)"
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


def batch_length(batch: Any, sample_ids: Callable[[Any], Tensor] | None = None) -> int | None:
    """Number of samples in a batch (:func:`~lightning_influence.batches.samples_in`: by its ids where
    ``sample_ids`` reads them); ``None`` when it holds neither ids nor a tensor with a batch dimension."""
    try:
        return samples_in(batch, sample_ids)
    except ValueError:
        return None


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


def dataset_length(trainer: L.Trainer) -> int | None:
    """The number of positions the training batches' sample ids index (the score store's size): the training
    dataset's length, or for a ``torch.utils.data.Subset`` (nested or not) of an
    :class:`~lightning_influence.data.IndexedDataset`, the ``IndexedDataset``'s, whose positions its ids are
    (a subset that changes between epochs, a curriculum, keeps each sample's id). ``None``: no length."""
    from lightning_influence.data import IndexedDataset

    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    inner = dataset
    while isinstance(inner, torch.utils.data.Subset):
        inner = inner.dataset
    if isinstance(inner, IndexedDataset):
        dataset = inner
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
