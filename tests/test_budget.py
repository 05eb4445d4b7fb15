"""--budget's planner (exact arithmetic on given timings), progressive resizing's schedule, and a
real short budgeted run that must end within ±10 % of its budget."""

import json
import time

import pytest

from cifar10_resnet50 import config as C
from cifar10_resnet50.config import parse_duration
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.training import budget, train
from test_train import tiny


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("600", 600), ("2.5m", 150)],
)
def test_durations_read_as_users_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10 m", "5x", "0s", "1m-5s"])
def test_unreadable_durations_are_one_line_errors(text):
    with pytest.raises(UserError, match="--budget"):
        parse_duration(text)


def test_budget_with_epochs_is_refused_before_any_work():
    with pytest.raises(UserError, match="drop --epochs"):
        C.override(C.Config(), {"train.budget": "10m", "train.epochs": 3})
    with pytest.raises(UserError, match="--budget '10 m'"):
        C.override(C.Config(), {"train.budget": "10 m"})


def _timings(step=1.0, frozen_step=0.5, per_image=0.001, save=2.0, scale=True):
    """Steps cost ``step`` seconds at 64 px, scaled by the pixel count when ``scale``."""

    def step_s(size, frozen):
        base = frozen_step if frozen else step
        return base * (size / 64) ** 2 if scale else base

    return budget.Timings(step_s, lambda size: per_image * (size / 64) ** 2, save)


def _shape(**changes):
    values = dict(
        full_steps=100,
        global_batch=128,
        val_images=5000,
        test_images=10000,
        strategy="full",
        freeze_epochs=1,
        progressive=False,
    )
    values.update(changes)
    return budget.Shape(**values)


def test_plan_spends_the_budget_with_equal_epochs_of_at_most_one_pass():
    # 64 px only: an epoch = 100 steps × 1 s + 5,000 × 1 ms validation + 2 s saves = 107 s;
    # the test evaluation 10 s + 2 s plots. 1,050 s budget, 20 s spent: 1,018 s left to train.
    plan = budget.plan(1050, 20, _shape(), _timings(), (64,))
    assert plan.epochs == 10  # 9 full epochs (963 s) would leave 53 s; 10 shorter ones fit
    assert plan.steps_per_epoch == (1018 - 10 * 7) // 10 == 94
    assert plan.train_s == pytest.approx(94 * 10 * 1.0 + 10 * 7)
    assert plan.final_s == pytest.approx(12)
    assert plan.eta_s == pytest.approx(20 + 1010 + 12)  # within a step per epoch of 1,050
    assert plan.images_per_s == pytest.approx(128)


def test_plan_never_exceeds_one_pass_and_uses_more_epochs_instead():
    plan = budget.plan(10_000, 0, _shape(), _timings(), (64,))
    assert plan.steps_per_epoch <= 100 and plan.epochs == 93
    assert plan.eta_s <= 10_000


def test_auto_resolution_takes_the_largest_size_that_still_gets_min_epochs():
    # Per-epoch time at 32/48/64/96 px: ~28, ~61, 107, ~238 s. With 700 s: 64 px gets 7
    # epochs (≥ 5), 96 px only 3 → 64 px.
    timed = []
    t = _timings()
    spy = budget.Timings(lambda s, f: timed.append(s) or t.step_s(s, f), t.eval_s, t.save_s)
    plan = budget.plan(700, 0, _shape(), spy, (32, 48, 64, 96, 128))
    assert plan.image_size == 64 and plan.epochs >= budget.MIN_EPOCHS
    assert 128 not in timed  # sizes above the first that missed are never timed


def test_a_budget_below_one_epoch_names_the_minimum():
    # 10 s set-up + 107 s epoch + 12 s test = 129 s, + 5 % margin → 136 s.
    with pytest.raises(UserError, match=r"too small for one epoch at 64 px.*use --budget 2m16s"):
        budget.plan(60, 10, _shape(), _timings(), (64,))


def test_gradual_plans_its_frozen_epochs_at_their_own_speed():
    gradual = _shape(strategy="gradual", freeze_epochs=2)
    frozen_first = budget.plan(1000, 0, gradual, _timings(), (64,))
    plain = budget.plan(1000, 0, _shape(), _timings(), (64,))
    assert frozen_first.epochs * frozen_first.steps_per_epoch > plain.epochs * plain.steps_per_epoch


def test_progressive_schedule_ramps_to_the_target_and_ends_there():
    assert budget.progressive_sizes(64, 1) == [64]
    assert budget.progressive_sizes(64, 2) == [32, 64]
    sizes = budget.progressive_sizes(160, 8)
    assert sizes == [80, 88, 104, 120, 128, 144, 160, 160]
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert budget.progressive_sizes(64, 4) == [32, 40, 48, 64]
    assert budget.progressive_sizes(40, 4) == [32, 32, 32, 40]  # never below 32 px


def test_progressive_plan_fits_more_steps_in_the_same_budget():
    fixed = budget.plan(2000, 0, _shape(), _timings(), (64,))
    ramp = budget.plan(2000, 0, _shape(progressive=True), _timings(), (64,))
    assert ramp.epochs * ramp.steps_per_epoch > fixed.epochs * fixed.steps_per_epoch
    assert ramp.sizes[-1] == 64 and ramp.sizes[0] == 32


def test_probe_budget_picks_the_largest_resolution_whose_features_fit():
    size, seconds = budget.plan_probe(
        300, lambda: 10.0, 50_000, 10_000, lambda px: 0.002 * (px / 64) ** 2, (32, 48, 64, 96)
    )
    # 64 px: 10 s + 60,000 × 2 ms + 40 s fit = 170 s; 96 px: 10 + 270 + 40 = 320 s > 300.
    assert size == 64 and seconds == pytest.approx(170)
    with pytest.raises(UserError, match="too small for the linear probe"):
        budget.plan_probe(30, lambda: 10.0, 50_000, 10_000, lambda px: 0.002, (64,))


def test_a_short_budgeted_run_ends_within_ten_percent_and_resumes_its_plan(
    synthetic_root, tmp_path
):
    cfg = tiny(synthetic_root, tmp_path / "r", **{"train.budget": "30s", "train.epochs": None})
    started = time.perf_counter()
    result = train.run(cfg)
    seconds = time.perf_counter() - started
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert 27 <= seconds <= 33, (seconds, plan)
    assert result.epochs_done == plan["epochs"] == saved["train"]["epochs"] >= 2
    assert saved["train"]["budget"] is None  # the plan is now the run's own settings
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["step"] == (i + 1) * plan["steps_per_epoch"] for i, row in enumerate(rows))
