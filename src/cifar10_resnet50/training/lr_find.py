"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's ``lr_find``).

Train for a short sweep while the learning rate grows exponentially from ``start_lr`` to
``end_lr``, with the run's own model, strategy, optimizer, precision, clipping and augmented
batches (mixup/CutMix included: the step and the batches are ``core``'s, as the loop's); record the loss;
stop once it has clearly diverged. The loss curve falls, flattens, then explodes: a good peak
learning rate sits well before the explosion. We suggest the lr at the minimum of the smoothed
loss divided by 10 (Smith's and fastai's classic rule) and also report the steepest descent.

The sweep changes the weights it trains, so :func:`sweep` snapshots the model's and optimizer's state first and restores them at the end, leaving both
exactly as they were (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data
from .. import model as model_lib
from ..config import Config, resolve, step_batch
from ..data import augment
from ..errors import UserError
from ..fileio import ensure_writable_dir, write_json
from ..options import LrFindOptions
from ..runtime import pick_device, pick_precision
from . import core
from .trainer import load_data, step_recipe, weights_for

log = logging.getLogger(__name__)

SMOOTHING = 0.98  # EMA of the loss, bias-corrected (as fastai)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this × its minimum


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]  # head learning rate at each step
    losses: list[float]  # smoothed training loss at each step
    suggested: float  # lr at the smoothed minimum / 10
    steepest: float  # lr where the smoothed loss falls fastest (per log-lr)
    plot: Path | None = None

    def table(self) -> str:
        return (
            f"lr range test: {len(self.lrs)} steps, lr {self.lrs[0]:.1e} → {self.lrs[-1]:.1e}\n"
            f"suggested --lr {self.suggested:.2e}  (minimum of the smoothed loss / 10)\n"
            f"steepest descent at lr {self.steepest:.2e}"
            + (f"\nplot: {self.plot}" if self.plot else "")
        )


def sweep(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    start_lr: float,
    end_lr: float,
    recipe: core.StepRecipe | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[list[float], list[float]]:
    """(lrs, smoothed losses); model and optimizer are restored to their state on entry.

    Each step is the training loop's own (:func:`core.train_step`: ``recipe``'s precision,
    label smoothing and gradient clipping; ``scaler`` for fp16) on ``batches`` of (images,
    targets); only the schedule differs: exponential from ``start_lr`` to ``end_lr``. Each
    param group keeps its ratio to the head's lr (the backbone stays at its
    ``backbone_lr_scale`` of the head), so the swept lr means the same as ``--lr``.
    """
    if steps < 2 or not 0 < start_lr < end_lr:
        raise UserError("lr-find needs --steps ≥ 2 and 0 < --start-lr < --end-lr")
    device = next(model.parameters()).device
    recipe = recipe or core.StepRecipe(device, None, 0.0, 0.0, channels_last=False)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    groups = optimizer.param_groups
    head = next((g["lr"] for g in groups if g.get("name", "").startswith("head")), groups[0]["lr"])

    def swept(i: int) -> float:  # the head's lr at step i
        return start_lr * (end_lr / start_lr) ** (min(i, steps - 1) / (steps - 1))

    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    try:
        for g in groups:  # a schedule's base is each group's lr now, not an earlier one's
            g.pop("initial_lr", None)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: swept(i) / head)
        opt = core.Optimization(optimizer, schedule, scaler)
        for i, (xb, target) in zip(range(steps), batches, strict=False):
            loss, _ = core.train_step(model, model, opt, recipe, xb, target)
            value = float(loss)  # one host sync per step: a sweep is ~100 steps
            if not math.isfinite(value):
                break
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            smoothed = avg / (1 - SMOOTHING ** (i + 1))
            lrs.append(swept(i))
            losses.append(smoothed)
            best = min(best, smoothed)
            if i > 10 and smoothed > DIVERGED * best:
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)  # the lrs too
    return lrs, losses


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(lr at the smoothed minimum / 10, lr of steepest descent per log-lr)."""
    if len(lrs) < 3:
        raise UserError(
            "the loss diverged within the first steps; lower --start-lr (or check the data)"
        )
    i_min = min(range(len(losses)), key=losses.__getitem__)
    slopes = [
        (losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
        for i in range(1, i_min or 1)
    ]
    steep = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[i_min]
    return lrs[i_min] / 10, steep


def _model(
    cfg: Config, num_classes: int, backbone: dict | None, device: torch.device
) -> model_lib.Classifier:
    """The run's model as the loop builds it: weights, architecture, device, memory layout."""
    m = cfg.model
    model = model_lib.build(m.weights, m.image_size, num_classes, backbone=backbone, arch=m.arch)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run(
    cfg: Config,
    *,
    steps: int = LrFindOptions.steps,
    start_lr: float = LrFindOptions.start_lr,
    end_lr: float = LrFindOptions.end_lr,
    out_dir: str | Path | None = None,
) -> LrFindResult:
    """The range test for the run ``cfg`` describes; writes ``lr_find.png`` and ``.json``."""
    device = pick_device(cfg.train.device)
    cfg = resolve(cfg, device.type)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    out = Path(out_dir) if out_dir else Path(t.out or "runs") / "lr_find"
    torch.manual_seed(t.seed)
    data.check(cfg.data.source, cfg.data.data_dir)
    backbone = model_lib.backbone_weights(
        cfg.model.weights, cfg.model.arch, t.progress, cfg.model.image_size
    )
    arrays = load_data(cfg, progress=t.progress)
    model = _model(cfg, len(arrays.classes), backbone, device)
    train_idx, _ = arrays.split(cfg.data.val_size, t.seed, cfg.data.subset)
    if augment.steps_per_epoch(len(train_idx), step_batch(t)) == 0:
        raise UserError(f"{len(train_idx)} images make no batch of {step_batch(t)}")
    batches = core.Batches(
        arrays.train_x.to(device), arrays.train_y.to(device), train_idx.to(device),
        batch_size=step_batch(t), seed=t.seed, augment=cfg.augment,
        num_classes=len(arrays.classes), balanced=t.balanced_sampling,
    )  # fmt: skip
    frozen = core.frozen_at(t.strategy, 0, t.freeze_epochs)
    core.set_frozen(model, frozen)
    amp = pick_precision(t.precision, device)
    # The run's optimizer with the head at lr 1: the sweep's schedule sets the lr itself.
    opt = core.Optimization.build(
        model, dataclasses.replace(cfg.optim, lr=1.0), pretrained=cfg.model.weights != "none",
        head_only=frozen, total_steps=steps, amp_dtype=amp, device_type=device.type,
    )  # fmt: skip
    log.info("lr range test: %d steps from %.0e to %.0e on %s", steps, start_lr, end_lr, device)
    lrs, losses = sweep(
        model, opt.optimizer, batches.endless(), steps=steps, start_lr=start_lr, end_lr=end_lr,
        recipe=step_recipe(cfg, device, amp, weights_for(cfg, arrays, train_idx, device)),
        scaler=opt.scaler,
    )  # fmt: skip
    suggested, steepest = suggest(lrs, losses)
    ensure_writable_dir(out)
    from ..evaluation.plots import lr_find_png

    plot = out / "lr_find.png"
    lr_find_png(lrs, losses, suggested, plot)
    write_json(
        out / "lr_find.json",
        {"lrs": lrs, "losses": losses, "suggested": suggested, "steepest": steepest},
    )
    return LrFindResult(lrs, losses, suggested, steepest, plot)
