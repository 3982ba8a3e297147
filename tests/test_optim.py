"""Learning-rate schedules and parameter groups: the rate at given iterations, exactly."""

import math

import pytest
import torch
from torch import nn

from resnetlab import TrainConfig
from resnetlab.training.optim import make_optimizer, make_scheduler


def rates(schedule: str, epochs: int = 10, steps_per_epoch: int = 10, **knobs) -> list[float]:
    """The learning rate used at each iteration of a run."""
    config = TrainConfig(schedule=schedule, epochs=epochs, lr=0.4, **knobs)
    optimizer = make_optimizer(nn.Linear(2, 2), config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_schedule_warms_up_then_falls_straight_to_zero():
    lr = rates("linear", warmup_epochs=1.0)  # 100 iterations, 10 of warm-up
    assert lr[:10] == pytest.approx([0.04 * (i + 1) for i in range(10)])
    # after warm-up: 0.4 * (1 - (i - 10) / 90), a straight line that reaches 0 after the last step
    assert lr[10:] == pytest.approx([0.4 * (1 - (i - 10) / 90) for i in range(10, 100)])
    assert lr[55] == pytest.approx(0.2) and lr[-1] == pytest.approx(0.4 / 90)


def test_cosine_schedule_is_half_a_cosine_after_warm_up():
    lr = rates("cosine", warmup_epochs=1.0)
    assert lr[10:] == pytest.approx([0.2 * (1 + math.cos(math.pi * (i - 10) / 90)) for i in range(10, 100)])
    # the two schedules meet half-way; cosine stays higher before, lower after
    linear = rates("linear", warmup_epochs=1.0)
    assert lr[55] == pytest.approx(linear[55])
    assert lr[30] > linear[30] and lr[80] < linear[80]


def test_step_schedule_divides_by_ten_at_the_milestones():
    lr = rates("step", warmup_epochs=0.0, milestones=[0.5, 0.75])
    assert lr == pytest.approx([0.4] * 50 + [0.04] * 25 + [0.004] * 25)


def test_norm_weights_and_biases_are_not_decayed_by_default():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=1e-3)).param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3), (2, 36)]
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (4,), (4,), (2,)]
    (group,) = make_optimizer(model, TrainConfig(weight_decay=1e-3, decay_norm_and_bias=True)).param_groups
    assert len(group["params"]) == 6 and group["weight_decay"] == 1e-3
