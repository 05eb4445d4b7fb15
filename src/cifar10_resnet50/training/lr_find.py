"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's ``lr_find``).

Train for a short sweep while the learning rate grows exponentially from ``start_lr`` to
``end_lr``, on the run's own model, strategy, precision and augmented batches; record the loss;
stop once it has clearly diverged. The loss curve falls, flattens, then explodes: a good peak
learning rate sits well before the explosion. We suggest the lr at the minimum of the smoothed
loss divided by 10 (Smith's and fastai's classic rule) and also report the steepest descent.

The sweep changes the weights it trains, so :func:`sweep` snapshots the model's and optimizer's state first and restores them at the end, leaving both
exactly as they were (tested).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import data
from .. import model as model_lib
from ..config import Config, resolve
from ..data import augment
from ..errors import UserError
from ..fileio import ensure_writable_dir, write_json
from ..runtime import autocast, pick_device, pick_precision
from .train import (
    frozen_at,
    load_data,
    make_optimizer,
    param_groups,
    set_backbone_frozen,
    set_train_mode,
)

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
    amp_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
) -> tuple[list[float], list[float]]:
    """(lrs, smoothed losses); model and optimizer are restored to their state on entry.

    Each param group keeps its ratio to the head's lr (the backbone stays at its
    ``backbone_lr_scale`` of the head), so the swept lr means the same as ``--lr``.
    """
    if steps < 2 or not 0 < start_lr < end_lr:
        raise UserError("lr-find needs --steps ≥ 2 and 0 < --start-lr < --end-lr")
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    groups = optimizer.param_groups
    head = next((g["lr"] for g in groups if g.get("name", "").startswith("head")), groups[0]["lr"])
    ratios = [g["lr"] / head for g in groups]
    device = next(model.parameters()).device
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    try:
        for i in range(steps):
            try:
                xb, yb = next(batches)
            except StopIteration:
                break
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for g, r in zip(optimizer.param_groups, ratios, strict=True):
                g["lr"] = lr * r
            with autocast(device, amp_dtype):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())  # one host sync per step: a sweep is ~100 steps
            if not math.isfinite(value):
                break
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            smoothed = avg / (1 - SMOOTHING ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if i > 10 and smoothed > DIVERGED * best:
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
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


def _batches(
    cfg: Config, arrays: data.Arrays, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's augmented training batches, epoch after epoch."""
    d = cfg.data
    train_idx, _ = arrays.split(d.val_size, cfg.train.seed, d.subset)
    x, y = arrays.train_x[train_idx].to(device), arrays.train_y[train_idx].to(device)
    if augment.steps_per_epoch(len(x), cfg.train.batch_size) == 0:
        raise UserError(f"{len(x)} images make no batch of {cfg.train.batch_size}")
    num_classes = len(arrays.classes)
    epoch = 0
    while True:
        for _, xb, yb, _ in augment.train_batches(
            x,
            y,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            epoch=epoch,
            padding=cfg.augment.crop_padding,
            flip=cfg.augment.flip,
            num_classes=num_classes,
        ):
            if cfg.train.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
        epoch += 1


def run(
    cfg: Config,
    *,
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
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
    backbone = model_lib.backbone_weights(cfg.model.weights, progress=t.progress)
    arrays = load_data(cfg, progress=t.progress)
    model = model_lib.build(
        cfg.model.weights, cfg.model.image_size, len(arrays.classes), backbone=backbone
    )
    batches = _batches(cfg, arrays, device)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    frozen = frozen_at(t.strategy, 0, t.freeze_epochs)
    set_backbone_frozen(model, frozen)
    set_train_mode(model, frozen)
    o = cfg.optim
    scale = o.backbone_lr_scale if cfg.model.weights != "none" else 1.0
    groups = param_groups(model, 1.0, scale, o.weight_decay)
    if frozen:
        groups = [g for g in groups if g["name"].startswith("head")]
    optimizer = make_optimizer(groups, o.optimizer, o.momentum)
    amp = pick_precision(t.precision, device)
    log.info("lr range test: %d steps from %.0e to %.0e on %s", steps, start_lr, end_lr, device)
    lrs, losses = sweep(
        model,
        optimizer,
        batches,
        steps=steps,
        start_lr=start_lr,
        end_lr=end_lr,
        amp_dtype=amp,
        label_smoothing=o.label_smoothing,
    )
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
