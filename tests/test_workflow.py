"""Tests of scripts/workflow.py: the learning-rate schedule."""

import math

import pytest
import torch

from scripts.workflow import lr_lambda


def test_constant_schedule():
    f = lr_lambda("constant", 10)
    assert [f(e) for e in range(10)] == [1.0] * 10


def test_cosine_schedule_from_one_to_the_final_ratio():
    f = lr_lambda("cosine", 11, final_ratio=0.01)
    values = [f(e) for e in range(11)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.01)
    assert values[5] == pytest.approx(0.01 + 0.99 * 0.5)  # half way: the mean of both ends
    assert all(a > b for a, b in zip(values, values[1:]))
    assert f(20) == pytest.approx(0.01)  # past max_epochs it stays at the floor
    assert values[2] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_cosine_with_lambdalr_steps_per_epoch():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 3, final_ratio=0.1))
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5 * 0.55, 0.05])
    # the schedule function is not stored: a resumed run follows its own --max_epochs
    assert sched.state_dict()["lr_lambdas"] == [None]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda("step", 10)
