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


def _study():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_study", REPO / "bench" / "train_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("lr", ["1.5e-3", "6e-3", "1.2e-2"])
def test_scan_arms_share_stage1_at_their_peak(lr):
    """The peak-LR scan: at each peak the two-stage arm is its one-stage arm up to the boundary, then drops
    to a third of the peak with weight decay 0."""
    two, one = _arm(f"ternary_two_stage_lr{lr}"), _arm(f"ternary_one_stage_lr{lr}")
    peak = float(lr)
    assert two.lr(39) == pytest.approx(peak) and one.lr(39) == pytest.approx(peak)
    assert all(two.lr(i) == one.lr(i) and two.wd(i) == one.wd(i) for i in range(500))
    assert two.lr(500) == pytest.approx(peak / 3) and two.lr(999) == one.lr(999) == 0.0
    assert all(two.wd(i) == 0.0 for i in range(500, 1000))


def test_compare_pairs_per_peak_and_tuned_schedules():
    """Each schedule is judged at its own best peak (lowest mean over the seeds); pairs are per seed."""
    m = _study()
    vals = {"ternary_two_stage": {0: 5.0, 1: 5.1, 2: 5.2},
            "ternary_one_stage": {0: 4.9, 1: 5.0, 2: 5.1},
            "ternary_two_stage_lr6e-3": {0: 4.80, 1: 4.90, 2: 5.00},
            "ternary_one_stage_lr6e-3": {0: 4.85, 1: 4.97, 2: 5.03},
            "fp_two_stage_lr1.5e-3": {0: 4.75, 1: 4.85, 2: 4.95}}
    res = m.compare(vals, list(vals), [0, 1, 2], "")
    assert res["ternary_two_stage_tuned_arm"] == "ternary_two_stage_lr6e-3"
    assert res["ternary_one_stage_tuned_arm"] == "ternary_one_stage_lr6e-3"
    assert res["two_stage_minus_one_stage_nats_per_seed"] == [0.1, 0.1, 0.1]
    assert res["two_stage_minus_one_stage_lr6e_3_nats_per_seed"] == [-0.05, -0.07, -0.03]
    assert res["two_stage_tuned_minus_one_stage_tuned_nats_mean"] == pytest.approx(-0.05)
    assert res["target_two_stage_better_met"] and res["target_two_stage_better_met_at_95"]
    assert res["ternary_minus_fp_tuned_nats_per_seed"] == [0.05, 0.05, 0.05]
    assert res["target_ternary_minus_fp_le_0_08_met_at_95"]
    # an arm missing a seed is not "tuned": its mean is over fewer runs
    vals["ternary_one_stage_lr6e-3"][2] = None
    assert m.compare(vals, list(vals), [0, 1, 2], "")["ternary_one_stage_tuned_arm"] == "ternary_one_stage"


def test_merge_rejects_other_run_lengths(tmp_path):
    m = _study()
    p = tmp_path / "old.json"
    p.write_text('{"arms": ["ternary_two_stage"], "seeds": [0], "steps": 840, "tokens_per_step": 32768, '
                 '"ternary_two_stage_val_loss_per_seed": [4.8], "ternary_two_stage_s0_val_curve": [[70, 6.5]]}')
    got = m.load_earlier([str(p)], 840, 32768)
    assert got["ternary_two_stage_s0"]["final"] == 4.8 and got["ternary_two_stage_s0"]["curve"] == {70: 6.5}
    with pytest.raises(SystemExit, match="not comparable"):
        m.load_earlier([str(p)], 420, 32768)
