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


def _step_with(accum_steps: int, xb, target):
    """One SGD step of a fresh from-scratch model (BatchNorm in eval mode: its statistics
    per chunk are the one thing accumulation does not reproduce, as in timm and the HF
    Trainer) with every part of the recipe that acts on the summed gradient."""
    import torch

    from cifar10_resnet50 import model as model_lib

    torch.manual_seed(0)
    model = model_lib.build("none", 32, 10)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    o = C.resolve(C.override(C.Config(), {"optim.lr": 0.1, "optim.warmup": 0.0}), "cpu").optim
    opt = core.Optimization.build(
        model, o, pretrained=False, head_only=False, total_steps=10, amp_dtype=None,
        device_type="cpu",
    )  # fmt: skip
    recipe = core.StepRecipe(
        torch.device("cpu"), None, label_smoothing=0.1, grad_clip=0.5, channels_last=False,
        accum_steps=accum_steps,
    )  # fmt: skip
    seen = []  # the batch sizes that went through the model

    def forward(x):
        seen.append(len(x))
        return model(x)

    loss, logits = core.train_step(forward, model, opt, recipe, xb, target)
    assert seen == [len(xb) // accum_steps] * accum_steps  # chunks only: what the card holds
    return model.state_dict(), loss, logits


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "mixed targets"])
def test_accumulated_chunks_make_the_step_of_the_whole_batch(soft):
    """--accum-steps 4 on a batch of 16 takes the step one batch of 16 takes (gradients,
    clipping of their sum, momentum, weight decay), within float tolerance; its loss and
    logits are the whole batch's."""
    import torch

    gen = torch.Generator().manual_seed(1)
    xb = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen)
    target = torch.randint(0, 10, (16,), generator=gen)
    if soft:
        target = torch.softmax(torch.randn(16, 10, generator=gen), 1)
    whole, loss1, logits1 = _step_with(1, xb, target)
    chunked, loss4, logits4 = _step_with(4, xb, target)
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-5)
    assert torch.allclose(logits4, logits1, atol=1e-5)
    moved = [k for k in whole if whole[k].is_floating_point() and "running" not in k]
    assert moved
    for k in moved:
        assert torch.allclose(chunked[k], whole[k], atol=1e-6, rtol=1e-4), k


def test_accum_steps_make_the_effective_batch_that_steps_and_the_lr_follow(
    synthetic_root, tmp_path
):
    """A run with --batch-size 8 --accum-steps 2 steps on 16 images at a time: the steps per
    epoch and the default lr are those of --batch-size 16."""
    base = tiny(synthetic_root, tmp_path / "a", **{"train.batch_size": 16})
    accum = tiny(synthetic_root, tmp_path / "b", **{"train.batch_size": 8, "train.accum_steps": 2})
    ra, rb = C.resolve(base, "cpu"), C.resolve(accum, "cpu")
    assert rb.optim.lr == ra.optim.lr == C.scaled_lr("sgd", 16)
    ta = trainer.build(ra, tmp_path / "a", Process.from_env("cpu"))
    tb = trainer.build(rb, tmp_path / "b", Process.from_env("cpu"))
    assert tb.steps_per_epoch == ta.steps_per_epoch
    assert tb.recipe.accum_steps == 2
    _, xa, _, _ = next(ta.batches.epoch(0))
    _, xb, _, _ = next(tb.batches.epoch(0))
    assert xb.shape[0] == 16 and (xa == xb).all()  # the same images, augmented alike
