"""DiffIn against leave-one-out retraining with the same optimizer, schedule, clipping and
accumulation (the issue's proof): one real Trainer run per setup with a replay and an online
callback, 120 retrainings with the real torch.optim optimizer. The README's optimizer table
comes from ``benchmarks/optimizers.py`` over the same setups (``tests/optimizer_cases.py``)."""

from __future__ import annotations

import pytest

from optimizer_cases import CASES, measure

# Spearman bars per setup: (replay, online). The online mode uses the default window (128 steps),
# so the first 256 of the 512 steps are scored with a truncated propagation.
BARS = {
    "sgd": (0.95, 0.85),
    "sgd-momentum": (0.95, 0.85),
    "sgd-nesterov-l2": (0.95, 0.85),
    "adam": (0.95, 0.75),  # online: Adam's second moment remembers ~1/(1-beta2) = 1000 steps (README)
    "adam-l2": (0.95, 0.75),
    "adamw": (0.95, 0.75),
    "adamw-amsgrad-warmup-cosine": (0.95, 0.85),
    "sgd-momentum-step-lr-groups": (0.95, 0.85),
    "adam-clip-norm": (0.95, 0.85),
    "sgd-clip-value": (0.90, 0.80),  # clamping is piecewise constant: its linearisation ignores crossings
    "adamw-accumulate-3": (0.95, 0.85),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scores_track_retraining_with_the_same_optimizer(name):
    result = measure(CASES[name], {"replay": {}, "online": {"mode": "online"}})
    replay, online = result["replay"]["spearman"], result["online"]["spearman"]
    print(f"{name}: {result['steps']} steps, spearman replay {replay:.4f}, online {online:.4f}")
    replay_bar, online_bar = BARS[name]
    assert replay >= replay_bar
    assert online >= online_bar
    if result["steps"] >= 512:
        assert result["online"]["truncated"] >= 256  # the online windows really were truncated
