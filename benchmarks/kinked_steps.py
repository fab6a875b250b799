"""Which finite-difference step (and scheme) suits networks with kinks (ReLU)? Accuracy per step against
leave-one-out retraining.

A finite-difference Hessian product across a ReLU kink sees the gradient's jump; central
differences with a relative step ``fd_rel_step`` average the curvature over ``theta +- eps v``;
a forward difference (``forward:STEP``) takes one gradient pass instead of two and sees one side.
For each setup (digits, float64, plain SGD, batch 32, 1024 training samples, a real
``Trainer.fit``), one training run carries one replay ``DiffIn`` per step size; the ground truth
retrains without each of ``--samples`` random samples. Prints a Markdown table of Spearman
correlations per step size, and their mean and minimum over the setups.

    OMP_NUM_THREADS=1 python benchmarks/kinked_steps.py            # 6 setups, about 25 minutes on one core
    OMP_NUM_THREADS=1 python benchmarks/kinked_steps.py --setups cnn-relu:0.03:12:0 --steps 1e-3 5e-3
    OMP_NUM_THREADS=1 python benchmarks/kinked_steps.py --setups mlp2-relu:0.03:8:0 mlp2-tanh:0.1:8:0 --steps 5e-3
    OMP_NUM_THREADS=1 python benchmarks/kinked_steps.py --steps 5e-3 forward:5e-3 forward:1e-2   # central vs forward
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import digits_problem, quiet_trainer  # noqa: E402

from lightning_influence import DiffIn  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, spearman  # noqa: E402
from lightning_influence.models import Classifier, SmallCNN  # noqa: E402

MODELS = {
    "cnn-relu": lambda lr: SmallCNN(channels=(4, 8), lr=lr, activation="relu"),
    "mlp-relu": lambda lr: Classifier(hidden=(32,), lr=lr, activation="relu"),
    "mlp2-relu": lambda lr: Classifier(hidden=(64, 32), lr=lr, activation="relu"),
    "mlp2-tanh": lambda lr: Classifier(hidden=(64, 32), lr=lr),  # the smooth counterpart
}
# model:lr:epochs:seed
DEFAULT_SETUPS = [
    "cnn-relu:0.03:12:0",
    "cnn-relu:0.03:12:1",
    "cnn-relu:0.1:12:0",
    "mlp-relu:0.03:16:0",
    "mlp-relu:0.1:16:0",
    "mlp2-relu:0.1:8:0",
]


def parse_step(text: str) -> tuple[str, float]:
    """``"5e-3"`` (central) or ``"forward:1e-2"`` -> (scheme, relative step)."""
    scheme, _, rel = text.rpartition(":")
    scheme = scheme or "central"
    if scheme not in ("central", "forward"):
        raise SystemExit(f"unknown scheme in {text!r}: use central or forward")
    return scheme, float(rel)


def label(step: str) -> str:
    scheme, rel = parse_step(step)
    return f"{rel:g}" if scheme == "central" else f"forward {rel:g}"


def measure(setup: str, steps: list[str], samples: int) -> dict:
    name, lr, epochs, seed = setup.split(":")
    problem = digits_problem(n=1024, batch_size=32, epochs=int(epochs), seed=int(seed))
    callbacks = []
    for step in steps:
        scheme, rel = parse_step(step)
        cb = DiffIn(target="val", mode="replay", target_loader=problem.val, finite_difference=scheme, fd_rel_step=rel)  # type: ignore[arg-type]
        cb._generate_state_key = (lambda key: (lambda **kw: key))(f"{scheme}-{rel}")  # several instances
        callbacks.append(cb)
    torch.manual_seed(int(seed))
    model = MODELS[name](float(lr)).double()
    recorder = StepRecorder()
    quiet_trainer(callbacks=[recorder, *callbacks]).fit(model, train_dataloaders=problem.train)
    ids = torch.randperm(problem.n, generator=torch.Generator().manual_seed(1))[:samples]
    truth = leave_one_out(model, recorder.initial_params, recorder.steps, recorder.optimizer, ids, problem.val)
    rho = {step: round(spearman(torch.stack([cb.scores[int(i)] for i in ids]), truth), 4) for step, cb in zip(steps, callbacks)}
    growth = {step: cb.scores.metadata["max_adjoint_growth"] for step, cb in zip(steps, callbacks)}
    return {"setup": setup, "steps": len(recorder.steps), "spearman": rho, "max_adjoint_growth": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, help="MODEL:LR:EPOCHS:SEED, MODEL in " + ", ".join(MODELS))
    parser.add_argument(
        "--steps",
        nargs="+",
        default=["1e-3", "2e-3", "5e-3", "1e-2", "2e-2"],
        help="relative steps of central differences; SCHEME:STEP for another scheme, e.g. forward:1e-2",
    )
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for setup in args.setups:
        rows.append(measure(setup, args.steps, args.samples))
        print(f"  {setup}: {rows[-1]['spearman']}", file=sys.stderr, flush=True)
    print("| model | lr | epochs | seed | steps | " + " | ".join(f"rel step {label(s)}" for s in args.steps) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.steps))
    for r in rows:
        name, lr, epochs, seed = r["setup"].split(":")
        print(f"| {name} | {lr} | {epochs} | {seed} | {r['steps']} | " + " | ".join(f"{r['spearman'][s]:.3f}" for s in args.steps) + " |")
    for name, agg in (("mean", statistics.mean), ("minimum", min)):
        print(f"| {name} | | | | | " + " | ".join(f"{agg(r['spearman'][s] for r in rows):.3f}" for s in args.steps) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
