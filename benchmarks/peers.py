"""Against the peers: time to scores for all N and fidelity to leave-one-out, in one run.

The problem is the scoreboard's (`benchmarks/fidelity.py`): digits in float64, a fixed batch
list, plain SGD lr 0.1, batch 32, 1024 training samples, 8 epochs (256 steps), an MLP 64-32-10
(`lightning_influence.models.Classifier`) trained with a real Trainer; target = the mean
cross-entropy over 300 validation samples; ground truth = exact trajectory-specific
leave-one-out retraining of `--samples` random training samples (`evaluation.leave_one_out`).

In the same process, on the same trained model:

- ours: DiffIn replay (the callback) and influence functions (`build("influence_function")`,
  exact Gauss-Newton and EK-FAC) and TracIn over epoch checkpoints, as in `fidelity.py`;
- kronfluence (EK-FAC, its `Task`/`Analyzer` API, all dtypes float64);
- captum `TracInCP` over the 8 end-of-epoch checkpoints (full parameters, no projection);
- dattri `TracInAttributor` (same checkpoints, projection off) and `IFAttributorExplicit`
  (exact Hessian of the mean training loss + `--dattri-damping` I), `IFAttributorEKFAC`.

Every peer score is converted to ours: predicted change of the mean validation loss when the
sample is removed, positive = the sample helps. Influence functions (kronfluence, dattri IF):
``g_val^T H^-1 g_z`` with H the curvature of the MEAN training loss estimates
``F(theta^-z) - F(theta)`` times n, so ours = peer score (summed over the 300 validation rows)
/ (300 n). TracIn (captum, dattri): ``sum_checkpoints w g_val . g_z`` with w = lr / batch size
(each sample is seen once per epoch with weight lr/32 in the SGD step), summed over the
validation rows / 300. No sign flip is applied: the printed Spearman column says whether that
convention holds (it would be strongly negative otherwise).

seconds = time to scores for all N: for methods that need something recorded during training
(DiffIn's trajectory, TracIn checkpoints), the fit time with that callback minus the plain fit
time of the same run; plus the post-hoc scoring time. A peer that is not installed or fails is a
row with its error.

    OMP_NUM_THREADS=1 python benchmarks/peers.py                 # about a minute on one thread
    OMP_NUM_THREADS=1 python benchmarks/peers.py --only kronfluence-ekfac,captum-tracincp --samples 40
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch progress bars (read when tqdm is imported)

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import Problem, column, fit, fmt, make_problem, one_epoch, score  # noqa: E402
from revision import git_revision  # noqa: E402

from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman  # noqa: E402

HIDDEN = (32,)
LR, BATCH = 0.1, 32


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class EpochCheckpoints(L.Callback):
    """Saves the network's state_dict at the end of every training epoch (TracIn checkpoints)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.paths: list[str] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.directory / f"epoch{trainer.current_epoch}.pt"
        torch.save({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}, path)
        self.paths.append(str(path))


class Context:
    """The trained model, its data as plain tensors in sample-id order, and shared timings."""

    def __init__(self, problem: Problem, model: nn.Module, plain_seconds: float, workdir: Path) -> None:
        self.problem = problem
        self.model = model
        self.plain_seconds = plain_seconds
        self.workdir = workdir
        batches = one_epoch(problem).batches
        ids = torch.cat([b[2] for b in batches])
        order = torch.argsort(ids)
        if not torch.equal(ids[order], torch.arange(problem.n)):
            raise ValueError("one epoch must hold every training id exactly once")
        self.x_train = torch.cat([b[0] for b in batches])[order]
        self.y_train = torch.cat([b[1] for b in batches])[order]
        self.x_val = torch.cat([b[0] for b in problem.val.batches])
        self.y_val = torch.cat([b[1] for b in problem.val.batches])
        self._checkpoints: tuple[list[str], float] | None = None

    def net(self) -> nn.Module:
        """A fresh copy of the trained network (logits from x), for a peer to wrap as it likes."""
        return copy.deepcopy(self.model.net)

    def checkpoints(self) -> tuple[list[str], float]:
        """End-of-epoch checkpoint paths and the fit seconds their saving added (one fit, shared)."""
        if self._checkpoints is None:
            directory = self.workdir / "checkpoints"
            directory.mkdir(exist_ok=True)
            saver = EpochCheckpoints(directory)
            _, seconds = fit(HIDDEN, self.problem, [saver])
            self._checkpoints = (saver.paths, max(seconds - self.plain_seconds, 0.0))
        return self._checkpoints


# ---------------------------------------------------------------- peers (each returns (scores[N], seconds))


def kronfluence_ekfac(ctx: Context) -> tuple[Tensor, float]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class DigitsTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:  # labels drawn from the model (the true Fisher), as kronfluence's examples do
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    start = time.perf_counter()
    task = DigitsTask()
    model = prepare_model(ctx.net(), task)
    analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=str(ctx.workdir / "kronfluence"))
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac", activation_covariance_dtype=f64, gradient_covariance_dtype=f64, eigendecomposition_dtype=f64, lambda_dtype=f64
    )
    score_args = ScoreArguments(per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)
    train = TensorDataset(ctx.x_train, ctx.y_train)
    query = TensorDataset(ctx.x_val, ctx.y_val)
    analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=256, factor_args=factor_args)
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", query_dataset=query, train_dataset=train, per_device_query_batch_size=300, per_device_train_batch_size=256, score_args=score_args
    )
    raw = analyzer.load_pairwise_scores("scores")["all_modules"]  # [n_query, n_train]
    seconds = time.perf_counter() - start
    return raw.sum(dim=0) / (len(ctx.x_val) * ctx.problem.n), seconds


def captum_tracincp(ctx: Context) -> tuple[Tensor, float]:
    from captum.influence import TracInCP

    paths, recording = ctx.checkpoints()
    start = time.perf_counter()

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, weights_only=True))
        return LR / BATCH  # the weight of a sample's gradient in one SGD step of a mean-loss batch

    tracin = TracInCP(
        ctx.net(),
        TensorDataset(ctx.x_train, ctx.y_train),
        paths,
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=256,
        sample_wise_grads_per_batch=True,
    )
    raw = tracin.influence((ctx.x_val, ctx.y_val))  # [n_val, n_train]
    return raw.sum(dim=0) / len(ctx.x_val), recording + time.perf_counter() - start


def _dattri_task(ctx: Context, checkpoints: Any) -> Any:
    from dattri.task import AttributionTask

    net = ctx.net()

    def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        if x.dim() == 1:  # one sample under vmap
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)  # mean over the batch

    return AttributionTask(loss_func=loss, model=net, checkpoints=checkpoints)


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def dattri_tracin(ctx: Context) -> tuple[Tensor, float]:
    from dattri.algorithm.tracin import TracInAttributor

    paths, recording = ctx.checkpoints()
    start = time.perf_counter()
    states = [torch.load(p, weights_only=True) for p in paths]
    attributor = TracInAttributor(
        task=_dattri_task(ctx, states), weight_list=torch.full((len(states),), LR / BATCH, dtype=torch.float64), normalized_grad=False
    )
    attributor.projector_kwargs = None  # full gradients (its constructor always sets a 512-dim random projection)
    raw = attributor.attribute(_loader(ctx.x_train, ctx.y_train, 256), _loader(ctx.x_val, ctx.y_val, 300))  # [n_train, n_val]
    return raw.sum(dim=1) / len(ctx.x_val), recording + time.perf_counter() - start


def _dattri_if(ctx: Context, make: Callable[[Any], Any]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    attributor = make(_dattri_task(ctx, {k: v.detach().clone() for k, v in ctx.model.net.state_dict().items()}))
    attributor.cache(_loader(ctx.x_train, ctx.y_train, ctx.problem.n))  # curvature of the mean loss over all N
    # one training batch: dattri recomputes the inverse-curvature product of the test side per training batch
    raw = attributor.attribute(_loader(ctx.x_train, ctx.y_train, ctx.problem.n), _loader(ctx.x_val, ctx.y_val, 300))  # [n_train, n_val]
    return raw.sum(dim=1) / (len(ctx.x_val) * ctx.problem.n), time.perf_counter() - start


def dattri_if_explicit(ctx: Context, damping: float) -> tuple[Tensor, float]:
    from dattri.algorithm.influence_function import IFAttributorExplicit

    return _dattri_if(ctx, lambda task: IFAttributorExplicit(task=task, regularization=damping))


def dattri_if_ekfac(ctx: Context, damping: float) -> tuple[Tensor, float]:
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    return _dattri_if(ctx, lambda task: IFAttributorEKFAC(task=task, damping=damping))


# label -> (library, method, how to score). Ours go through fidelity.score (the registry).
METHODS: dict[str, tuple[str, str]] = {
    "diffin-replay": ("lightning_influence", "DiffIn replay (callback)"),
    "if-exact": ("lightning_influence", "influence function, exact Gauss-Newton"),
    "if-ekfac": ("lightning_influence", "influence function, EK-FAC"),
    "tracin-checkpoints": ("lightning_influence", "TracIn, checkpoints"),
    "kronfluence-ekfac": ("kronfluence", "EK-FAC influence (Analyzer)"),
    "captum-tracincp": ("captum", "TracInCP, 8 epoch checkpoints"),
    "dattri-tracin": ("dattri", "TracInAttributor, 8 epoch checkpoints"),
    "dattri-if-explicit": ("dattri", "IFAttributorExplicit (exact Hessian)"),
    "dattri-if-ekfac": ("dattri", "IFAttributorEKFAC"),
}


def run(label: str, ctx: Context, args: argparse.Namespace) -> tuple[Tensor, float]:
    if METHODS[label][0] == "lightning_influence":
        scores, seconds = score(label, HIDDEN, ctx.problem, ctx.plain_seconds)
        return column(scores, torch.arange(ctx.problem.n)), seconds
    peers: dict[str, Callable[[], tuple[Tensor, float]]] = {
        "kronfluence-ekfac": lambda: kronfluence_ekfac(ctx),
        "captum-tracincp": lambda: captum_tracincp(ctx),
        "dattri-tracin": lambda: dattri_tracin(ctx),
        "dattri-if-explicit": lambda: dattri_if_explicit(ctx, args.dattri_damping),
        "dattri-if-ekfac": lambda: dattri_if_ekfac(ctx, args.dattri_damping),
    }
    return peers[label]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated labels (default all): {', '.join(METHODS)}")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=100, help="leave-one-out retrainings")
    parser.add_argument("--dattri-damping", type=float, default=1e-3, help="absolute damping of dattri's IF attributors")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = list(METHODS) if args.only is None else args.only.split(",")
    unknown = [lab for lab in labels if lab not in METHODS]
    if unknown:
        parser.error(f"unknown labels {unknown}; choose from {list(METHODS)}")
    start = time.perf_counter()
    problem = make_problem(args.n, args.epochs, 0.0)
    recorder = StepRecorder()
    model, _ = fit(HIDDEN, problem, [recorder])
    _, plain = fit(HIDDEN, problem, [])
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[: args.samples]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    print(f"ground truth: {args.samples} leave-one-out retrainings in {time.perf_counter() - start:.0f}s; plain fit {plain:.1f}s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(problem, model, plain, Path(tmp))
        for label in labels:
            library, method = METHODS[label]
            row: dict[str, Any] = {"label": label, "library": library, "method": method, "version": version(library.replace("_", "-"))}
            try:
                values, seconds = run(label, ctx, args)
                values = values.detach()
                if values.shape != (problem.n,) or not torch.isfinite(values).all():
                    raise ValueError(f"scores of shape {tuple(values.shape)}, finite: {bool(torch.isfinite(values).all())}")
                est = values.to(torch.float64)[ids]
                row.update(spearman=spearman(est, truth), pearson=pearson(est, truth), seconds=seconds)
                row["scale"] = float((est * truth).sum() / (est * est).sum())  # least-squares factor to LOO units
            except Exception as err:  # a missing or failing peer is a row with its error, not a crash
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
                if args.verbose:
                    traceback.print_exc()
            print(f"{label}: {row}", flush=True)
            rows.append(row)
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "lightning", "kronfluence", "captum", "dattri"))
    print(
        f"\nlightning_influence {git_revision(str(Path(__file__).resolve().parents[1]), 'lightning_influence')}; {versions}; "
        f"digits float64, MLP 64-32-10, SGD lr {LR}, batch {BATCH}, {args.n} samples, {args.epochs} epochs; "
        f"LOO on {args.samples} samples; plain fit {plain:.1f}s; {time.perf_counter() - start:.0f}s in all.\n"
    )
    print("| library | method | version | LOO Spearman | LOO Pearson | LOO / score (least squares) | seconds to scores (all N) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['library']} | {r['method']} | {r['version']} | n/a: {r['error']} | | | |")
            continue
        print(f"| {r['library']} | {r['method']} | {r['version']} | {fmt(r['spearman'])} | {fmt(r['pearson'])} | {r['scale']:.3g} | {fmt(r['seconds'], 1)} |")


if __name__ == "__main__":
    main()
