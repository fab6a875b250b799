"""Cost of the ground-truth retraining on batch-norm models, against the same model without batch norm.

1024 digits (float64) in 64 shuffled micro-batches of 16, one epoch, SGD (lr 0.1, momentum 0.9), an
MLP 64-32-10 with tanh: `no-bn` (Linear with bias), `bn` (Linear without bias, BatchNorm1d), and the
variants `bn-cumulative` (momentum=None) and `bn-no-running-stats` (track_running_stats=False).
Timed: `leave_one_out` of 100 samples (101 runs) and `subset_retraining` of 20 random half-subsets,
against 100 held-out targets, one thread. A batch-norm run removing a sample evaluates its own
sub-batch (batch statistics without the sample), so it cannot share the full batch's evaluation.

    OMP_NUM_THREADS=1 python benchmarks/batchnorm_retraining_speed.py
    OMP_NUM_THREADS=1 python benchmarks/batchnorm_retraining_speed.py --models no-bn,bn --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import quiet_trainer  # noqa: E402

from lightning_influence.data import FixedBatches, load_digits_tensors  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, random_removals, subset_retraining  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402

MODELS: dict[str, Callable[[], nn.Module]] = {
    "no-bn": lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
    "bn": lambda: nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10)),
    "bn-cumulative": lambda: nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, momentum=None), nn.Tanh(), nn.Linear(32, 10)),
    "bn-no-running-stats": lambda: nn.Sequential(
        nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, track_running_stats=False), nn.Tanh(), nn.Linear(32, 10)
    ),
}


class Net(Classifier):
    def __init__(self, body: nn.Module) -> None:
        super().__init__(hidden=(), lr=0.1, optimizer="sgd", optimizer_options={"momentum": 0.9})
        self.net = body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names of " + ", ".join(MODELS))
    parser.add_argument("--repeats", type=int, default=1, help="timings per measurement (the fastest is shown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = load_digits_tensors(torch.float64)
    order = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    batches = [(x[order[i : i + 16]], y[order[i : i + 16]], order[i : i + 16]) for i in range(0, 1024, 16)]
    target = [(x[1100:1200], y[1100:1200], torch.arange(100))]
    ids = list(range(0, 1000, 10))
    removals = random_removals(list(range(1024)), 20, keep_fraction=0.5)
    print(f"{'model':<22}{'leave_one_out 100 (s)':>24}{'subsets 20 (s)':>18}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        recorder = StepRecorder(verify=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = Net(MODELS[name]()).double()
            quiet_trainer(callbacks=[recorder]).fit(module, train_dataloaders=FixedBatches(batches))
        assert recorder.optimizer is not None and len(recorder.steps) == 64
        spec = (module, recorder.initial_params, recorder.steps, recorder.optimizer)
        times = []
        for run in (lambda: leave_one_out(*spec, ids, target), lambda: subset_retraining(*spec, removals, target)):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            times.append(best)
        print(f"{name:<22}{times[0]:>24.2f}{times[1]:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
