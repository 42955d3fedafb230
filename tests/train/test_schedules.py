"""The two-stage LR / WD schedules of the 2B4T recipe: values at chosen steps, the drop, WD = 0."""

import math

import pytest
import torch

from bitnet158.errors import ConfigError
from bitnet158.train.schedules import Schedule


def _two(**kw):
    base = dict(total_steps=1000, warmup_steps=100, kind="two_stage", lr_peak=1.5e-3, lr_peak2=6e-4,
                lr_min_ratio=0.1, lr_final=0.0, stage2_fraction=0.5, wd_peak=0.1)
    return Schedule(**{**base, **kw})


def test_warmup_is_linear_to_peak():
    s = _two()
    assert s.lr(0) == pytest.approx(1.5e-3 / 100)
    assert s.lr(49) == pytest.approx(1.5e-3 * 50 / 100)
    assert s.lr(99) == pytest.approx(1.5e-3)
    assert s.lr(100) == pytest.approx(1.5e-3)  # cosine starts at its peak


def test_stage1_cosine_is_planned_over_the_whole_run():
    s = _two()
    span = 1000 - 1 - 100
    for step in (200, 300, 499):
        frac = (step - 100) / span
        want = 1.5e-4 + (1.5e-3 - 1.5e-4) * 0.5 * (1 + math.cos(math.pi * frac))
        assert s.lr(step) == pytest.approx(want)


def test_abrupt_drop_at_the_boundary_then_cosine_to_zero():
    s = _two()
    assert s.boundary == 500
    assert s.stage(499) == 1 and s.stage(500) == 2
    before, after = s.lr(499), s.lr(500)
    assert after == pytest.approx(6e-4)
    assert before > 1.3 * after                      # a drop, not a smooth decay
    assert s.lr(501) < after and s.lr(501) > 0.99 * after
    mid = 500 + (999 - 500) / 2
    assert s.lr(int(mid)) == pytest.approx(3e-4, rel=1e-2)
    assert s.lr(999) == 0.0
    lrs = [s.lr(i) for i in range(100, 1000)]
    # monotone non-increasing after warmup (the drop included)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_two_stage():
    s = _two()
    assert s.wd(0) == pytest.approx(0.1)              # starts at its peak
    assert s.wd(250) == pytest.approx(0.05 * (1 + math.cos(math.pi * 250 / 999)))
    assert 0.0 < s.wd(499) < 0.1
    for step in (500, 501, 750, 999):
        assert s.wd(step) == 0.0                      # exactly zero in stage 2


def test_one_stage_and_constant():
    s = Schedule(total_steps=1000, warmup_steps=100, kind="one_stage", lr_peak=1e-3, wd_peak=0.1)
    assert s.lr(99) == pytest.approx(1e-3)
    assert s.lr(549) == pytest.approx(5e-4, rel=1e-2)
    assert s.lr(999) == 0.0
    assert s.stage(999) == 1 and s.wd(999) == 0.1
    c = Schedule(total_steps=10, warmup_steps=2, kind="constant", lr_peak=1e-4, wd_peak=0.0)
    assert [c.lr(i) for i in (0, 1, 5, 9)] == pytest.approx([5e-5, 1e-4, 1e-4, 1e-4])


def test_apply_sets_every_group_and_exempts_norms():
    p1, p2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "weight_decay_exempt": True}],
                            lr=123.0, weight_decay=0.5)
    s = _two()
    lr, wd = s.apply(opt, 300)
    assert opt.param_groups[0]["lr"] == lr == s.lr(300)
    assert opt.param_groups[0]["weight_decay"] == wd == s.wd(300) > 0
    assert opt.param_groups[1]["weight_decay"] == 0.0
    s.apply(opt, 600)
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="lr_peak2"):
        _two(lr_peak2=1.4e-3)                          # no drop: above where stage 1 stops
    with pytest.raises(ConfigError, match="stage2_fraction"):
        _two(stage2_fraction=1.5)
    with pytest.raises(ConfigError, match="kind"):
        _two(kind="linear")
    with pytest.raises(ConfigError, match="unknown field"):
        Schedule.from_dict({"lr_peek": 1.0}, total_steps=10)
