"""Forward-INF against leave-one-out retraining, across its step settings.

Digits (float64, fixed batch list, SGD lr 0.1, batch 32, 1024 samples, 256 steps), the
validation loss as target, 100 random samples retrained without. For each setting: Spearman,
Pearson, and the least-squares slope of the truth on the score ("ratio": 1 means the units
match leave-one-out). `learning_rate_sum` is the training run's summed learning rate (25.6).

    OMP_NUM_THREADS=1 python benchmarks/forward_inf.py            # MLP 64-32-10, ~1 minute
    OMP_NUM_THREADS=1 python benchmarks/forward_inf.py logreg
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import digits_problem, quiet_trainer  # noqa: E402

from lightning_influence.data import FixedBatches  # noqa: E402
from lightning_influence.estimators import Target, build  # noqa: E402
from lightning_influence.evaluation import StepRecorder, leave_one_out, pearson, spearman  # noqa: E402
from lightning_influence.models import Classifier  # noqa: E402

SETTINGS = [
    dict(lr=1e-3),
    dict(lr=0.1, steps=10),
    dict(lr=0.1, steps=30),
    dict(lr=0.1, steps=100),
    dict(lr=0.1, steps=300),
    dict(lr=1.0, steps=100),
    dict(lr=5e-3, optimizer="adam"),
    dict(lr=5e-3, optimizer="adam", direction="ascent", signed=False),  # the public code's setting
]


def main() -> None:
    torch.set_num_threads(1)
    hidden = () if "logreg" in sys.argv[1:] else (32,)
    p = digits_problem(n=1024, batch_size=32, epochs=8)
    torch.manual_seed(0)
    model = Classifier(hidden=hidden, lr=0.1).double()
    rec = StepRecorder()
    quiet_trainer(callbacks=[rec]).fit(model, train_dataloaders=p.train)
    ids = torch.randperm(p.n, generator=torch.Generator().manual_seed(1))[:100]
    truth = leave_one_out(model, rec.initial_params, rec.steps, rec.optimizer, ids, p.val)
    one_epoch = FixedBatches(p.train.batches[: p.n // 32])
    lr_sum = 0.1 * len(p.train.batches)
    print("| setting | Spearman | Pearson | ratio |\n|---|---:|---:|---:|")
    for opts in SETTINGS:
        s = build("forward_inf", learning_rate_sum=lr_sum, progress=False, **opts).scores(model, one_epoch, Target("val", p.val))
        est = torch.stack([s[int(i)] for i in ids])
        ratio = float((est * truth).sum() / (est * est).sum())
        print(f"| {opts} | {spearman(est, truth):.3f} | {pearson(est, truth):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
