"""The training study's schedules follow SPEC §5: the two-stage drop, its stage-2 peak and zero weight decay,
and a one-stage comparison with the same peak, final LR and stage-1 weight-decay cosine."""

from pathlib import Path

import pytest

from bitnet158.train.recipe import Recipe
from bitnet158.train.schedules import Schedule

REPO = Path(__file__).resolve().parents[2]


def _sched(recipe: str, steps: int = 1000) -> Schedule:
    r = Recipe.from_file(REPO / "recipes" / recipe, overrides=[f"train.steps={steps}", "schedule.warmup_steps=40"])
    return r.make_schedule()


def test_two_stage_drop_peak2_and_zero_wd():
    s = _sched("embedded-pretrain.toml")
    assert s.kind == "two_stage" and s.boundary == 500
    assert s.lr(39) == pytest.approx(3e-3)                       # warmup ends at the stage-1 peak
    assert s.lr(499) > 1.5e-3 and s.lr(500) == pytest.approx(1e-3)   # abrupt drop to the stage-2 peak
    assert s.lr(999) == 0.0
    assert s.wd(0) == pytest.approx(0.1) and 0.04 < s.wd(499) < 0.06
    assert all(s.wd(i) == 0.0 for i in range(500, 1000))         # exactly 0 in stage 2


def test_one_stage_same_peak_final_and_wd_cosine():
    one, two = _sched("study-ternary-one-stage.toml"), _sched("embedded-pretrain.toml")
    assert one.kind == "one_stage" and one.wd_cosine
    assert one.lr(39) == two.lr(39) and one.lr(999) == two.lr(999) == 0.0
    # weight decay: the two-stage stage-1 cosine over the whole run, never the stage-2 zero
    assert all(one.wd(i) == two.wd(i) for i in range(0, 500))
    assert one.wd(750) > 0.0 and one.wd(999) == pytest.approx(0.0, abs=1e-12)


def test_one_stage_wd_constant_by_default():
    s = Schedule(total_steps=100, warmup_steps=5, kind="one_stage", lr_peak=1e-3, wd_peak=0.1)
    assert {s.wd(i) for i in range(100)} == {0.1}


def _arm(name: str, steps: int = 1000) -> Schedule:
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_study", REPO / "bench" / "train_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recipe, sets = mod.ARMS[name]
    r = Recipe.from_file(REPO / recipe, overrides=sets + [f"train.steps={steps}", "schedule.warmup_steps=40"])
    return r.make_schedule()


def test_study_arms_share_stage1_then_drop():
    """In the study the two-stage run is the one-stage run up to the boundary (same LR and WD at every
    update), then drops to the stage-2 peak with weight decay 0."""
    two, one = _arm("ternary_two_stage"), _arm("ternary_one_stage")
    assert two.boundary == 500
    assert all(two.lr(i) == one.lr(i) and two.wd(i) == one.wd(i) for i in range(500))
    assert two.lr(499) > 1.4e-3 and two.lr(500) == pytest.approx(1e-3) and two.lr(999) == 0.0
    assert all(two.wd(i) == 0.0 for i in range(500, 1000)) and one.wd(700) > 0.0
    fp = _arm("fp_two_stage_lr1.5e-3")
    assert fp.lr(39) == pytest.approx(1.5e-3) and fp.lr(500) == pytest.approx(5e-4) and fp.lr(500) < fp.lr(499)
