"""The training core (issue 18): the loop, lr-find and the budget's timing steps take the same
step on the same augmented batches, so they cannot drift apart again (lr-find once trained
without gradient clipping or mixup/CutMix, and budgets were timed on steps without them)."""

from __future__ import annotations

import dataclasses

import pytest

from cifar10_resnet50 import config as C
from cifar10_resnet50.runtime import Process
from cifar10_resnet50.training import core, lr_find, planning, train, trainer
from cifar10_resnet50.training.callbacks import Callback
from test_train import tiny

# Everything the step does besides the plain gradient: soft targets from mixup and CutMix,
# label smoothing, and a clipping bound low enough that every step is clipped.
RECIPE = {
    "augment.mixup": 0.4,
    "augment.cutmix": 1.0,
    "optim.label_smoothing": 0.1,
    "optim.grad_clip": 0.05,
    "optim.lr": 0.05,
    "optim.warmup": 0.0,  # the run's first step is at the peak lr, as the sweep's first
    "train.precision": "fp32",
    "train.epochs": 1,
    "train.steps_per_epoch": 2,
}


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def step_end(self, trainer, state, out):
        self.values.append(float(out.loss))


def test_an_lr_find_step_makes_the_update_a_training_step_makes(synthetic_root, tmp_path):
    """From the same initial weights, lr-find's first step at the run's lr changes the weights
    exactly as the run's first step does: the second losses agree (before this core, lr-find
    neither clipped nor mixed, and its second loss differed)."""
    cfg = tiny(synthetic_root, tmp_path / "run", **RECIPE)
    seen = Losses()
    train.run(cfg, final_eval=False, callbacks=[seen])
    found = lr_find.run(cfg, steps=3, start_lr=0.05, end_lr=0.5, out_dir=tmp_path / "lf")
    # lr-find reports losses smoothed by an EMA (bias-corrected): undo it for the raw ones.
    beta = lr_find.SMOOTHING
    first = found.losses[0]
    second = found.losses[1] * (1 + beta) - beta * first
    assert found.lrs[0] == 0.05
    assert first == pytest.approx(seen.values[0], rel=1e-6)  # same weights, same mixed batch
    assert second == pytest.approx(seen.values[1], rel=1e-5)  # same update


def test_the_budget_timer_steps_on_the_runs_own_mixed_batches(synthetic_root, tmp_path):
    """Timing steps see the run's augmented batches, mixup/CutMix's soft targets included
    (they were once timed on plain ones), and are undone afterwards."""
    cfg = tiny(synthetic_root, tmp_path / "run", **RECIPE)
    t = trainer.build(C.resolve(cfg, "cpu"), tmp_path / "run", Process.from_env("cpu"))
    targets = []

    @dataclasses.dataclass(frozen=True)
    class Recording(core.Batches):
        def endless(self):
            for xb, target in super().endless():
                targets.append(target)
                yield xb, target

    fields = dataclasses.fields(t.batches)
    t.batches = Recording(**{f.name: getattr(t.batches, f.name) for f in fields})
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    # (a deadline far away: two timed steps, however slow this machine is right now)
    planning.time_steps(t, 32, frozen=False, deadline=t.clock() + 3600, timed=2)
    assert len(targets) == 3  # one warm-up step, two timed
    assert all(target.ndim == 2 and target.dtype.is_floating_point for target in targets)
    assert all((before[k] == v).all() for k, v in t.model.state_dict().items())
    assert t.opt.scheduler.last_epoch == 0
