"""The training core: what the loop, ``lr-find`` and the budget's timing steps all call, so the
three cannot drift apart (they once did: lr-find trained without gradient clipping or
mixup/CutMix, and budgets were planned on steps without them).

* :class:`Optimization`: optimizer + lr schedule + gradient scaler, built from the settings.
* :class:`Batches`: the augmented batches of an epoch (crop, flip, mixup/CutMix) from the
  augmentation settings, as one value.
* :func:`train_step`: one optimizer step (precision, scaler, clipping; the module it calls may
  be DDP- and/or compile-wrapped, see :func:`wrapped`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .. import model as model_lib
from ..config import AugmentConfig, OptimConfig
from ..data import augment
from ..runtime import autocast
from .ema import WeightAverage

# --------------------------------------------------------------------------- optimization


def param_groups(
    model: model_lib.Classifier, head_lr: float, backbone_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Head and backbone at their own learning rates; no weight decay on BatchNorm or biases
    ("no bias decay", He et al. 2019, Bag of Tricks: decaying them only fights BatchNorm)."""
    groups = []
    for name, params, lr in (
        ("backbone", model.backbone_parameters(), backbone_lr),
        ("head", list(model.head.parameters()), head_lr),
    ):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.append(
            {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
        )
    return groups


def make_optimizer(
    groups: list[dict[str, Any]], name: str, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's peak lr at a step.

    cosine: linear warm-up, then cosine decay to 0.
    onecycle: cosine up from 1/25 over the first 25% (or the warm-up, if longer), then cosine
    down to 1e-4 (fastai's fit_one_cycle shape).
    """

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    up = max(warmup_steps, int(0.25 * total_steps), 1)

    def onecycle(step: int) -> float:
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / up))
        progress = min((step - up) / max(1, total_steps - up), 1.0)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))

    return cosine if schedule == "cosine" else onecycle


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, total_steps, int(warmup * total_steps))
    )


@dataclasses.dataclass
class Optimization:
    """Optimizer, lr schedule, gradient scaler and the weight EMA (``--ema``): what one step
    updates besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightAverage | None = None

    @classmethod
    def build(
        cls,
        model: model_lib.Classifier,
        o: OptimConfig,
        *,
        pretrained: bool,
        head_only: bool,
        total_steps: int,
        amp_dtype: torch.dtype | None,
        device_type: str,
        schedule: Callable[[int], float] | None = None,
        ema: float = 0.0,
    ) -> Optimization:
        """From the optimizer settings (``o.lr`` resolved): the backbone at ``lr ×
        backbone_lr_scale`` when pretrained; ``head_only`` leaves the backbone out (the
        linear strategy); ``schedule``, a factor per step, replaces ``o.schedule``'s (lr-find's
        exponential sweep); ``ema``: the weight EMA's decay (0: none), averaging ``model`` as it
        is now (on its device, in its memory format)."""
        backbone_lr = o.lr * (o.backbone_lr_scale if pretrained else 1.0)
        groups = param_groups(model, o.lr, backbone_lr, o.weight_decay)
        if head_only:
            groups = [g for g in groups if g["name"].startswith("head")]
        optimizer = make_optimizer(groups, o.optimizer, o.momentum)
        if schedule is None:
            scheduler = make_scheduler(optimizer, o.schedule, total_steps, o.warmup)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # Loss scaling only for fp16: bf16 has fp32's range.
        scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
        return cls(optimizer, scheduler, scaler, WeightAverage(model, ema) if ema else None)

    def rescheduled(self, o: OptimConfig, total_steps: int) -> None:
        """The schedule for ``total_steps`` in all, at the current step: as built on resume
        from a config that had that length from the start (``--budget``'s plan and re-plans)."""
        scheduler = make_scheduler(self.optimizer, o.schedule, total_steps, o.warmup)
        scheduler.load_state_dict(self.scheduler.state_dict())  # the position (steps done)
        for group, base, factor in zip(
            self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        """What ``last.pt`` saves of it (``train_state``'s optimizer, scheduler and scaler)."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def evaluated(self, model: model_lib.Classifier) -> model_lib.Classifier:
        """The model a run validates and keeps as best: the weight EMA's, else ``model``."""
        return model if self.ema is None else self.ema.module

    @property
    def lr(self) -> float:
        """The head's current lr (the last group's)."""
        return self.scheduler.get_last_lr()[-1]


@contextlib.contextmanager
def undone(model: torch.nn.Module, opt: Optimization) -> Iterator[None]:
    """Steps taken inside this block are undone at its end: weights, BatchNorm statistics,
    optimizer, schedule and scaler are as they were (the budget's timing steps, lr-find)."""
    snapshot = copy.deepcopy([model.state_dict(), opt.state_dict()])
    try:
        yield
    finally:
        model.load_state_dict(snapshot[0])
        opt.load_state_dict(snapshot[1])


# --------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class Batches:
    """The training images on the device and how each epoch's batches are drawn from them.

    ``x``: uint8 [N,3,S,S] on the training device (S the stored size); ``y``: int64 [N];
    ``rows``: which of them are the training split (int64 on the device), indexed per batch:
    no copy of the split (on a CPU that copy doubled the host memory the images take). All
    randomness is keyed by (seed, epoch, batch), so any epoch can be replayed from any batch
    (exact resume) and every caller of :meth:`epoch` sees the same augmented batches."""

    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor
    batch_size: int  # per process
    seed: int
    augment: AugmentConfig
    num_classes: int
    rank: int = 0
    world_size: int = 1
    steps: int | None = None  # per epoch; None: one full pass
    device: torch.device | None = None  # the training device when x stays in host memory
    balanced: bool = False  # --balanced-sampling

    def epoch(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(batch index, images, labels, targets)`` from batch ``start`` to the epoch's end;
        targets are soft labels float [B,C] under mixup/CutMix, else the labels."""
        return augment.train_batches(
            self.x, self.y, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
            start=start, recipe=self.augment, num_classes=self.num_classes, rank=self.rank,
            balanced=self.balanced, world_size=self.world_size,
            steps=self.steps, rows=self.rows, device=self.device,
        )  # fmt: skip

    def endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, targets)`` epoch after epoch, from epoch 0 (lr-find, timing steps)."""
        for epoch in itertools.count():
            for _, xb, _, target in self.epoch(epoch):
                yield xb, target


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """How a step computes, from the settings: precision, loss, clipping, memory layout."""

    device: torch.device
    amp_dtype: torch.dtype | None
    label_smoothing: float
    grad_clip: float  # max global gradient norm; 0 = off
    channels_last: bool
    accum_steps: int = 1  # chunks of the batch whose gradients one step sums (--accum-steps)
    class_weights: torch.Tensor | None = None  # float [C] on the device: the loss's weights
    # Called after every optimizer step, wherever it runs (the loop, the budget's timing
    # steps, lr-find): tests pass a clock's tick, so time advances per step.
    after: Callable[[], None] | None = None


def train_step(
    forward: torch.nn.Module,
    model: torch.nn.Module,
    opt: Optimization,
    recipe: StepRecipe,
    xb: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the loss and logits, still on the device (no host sync).

    ``forward`` is what is called (``model`` itself, or wrapped in DDP and/or compiled);
    ``model``'s parameters are clipped. ``xb``: uint8 [B,3,S,S]; ``target``: int64 [B] or
    soft labels float [B,C]. With ``recipe.accum_steps`` N > 1 the batch goes through the
    model in N chunks whose gradients add up to the whole batch's (each chunk's mean loss
    weighted by its share); under DDP only the last chunk's backward all-reduces."""
    if recipe.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    opt.optimizer.zero_grad(set_to_none=True)
    chunks = list(zip(xb.chunk(recipe.accum_steps), target.chunk(recipe.accum_steps), strict=True))
    losses, outputs = [], []
    for k, (xc, tc) in enumerate(chunks):
        with _gradient_sync(forward, last=k == len(chunks) - 1):
            with autocast(recipe.device, recipe.amp_dtype):
                logits = forward(xc)  # uint8 [b,3,S,S] → float [b,C]
            loss = F.cross_entropy(
                logits.float(), tc, weight=recipe.class_weights,
                label_smoothing=recipe.label_smoothing,
            )  # fmt: skip
            if len(chunks) > 1:
                loss = loss * (len(xc) / len(xb))
            opt.scaler.scale(loss).backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    if recipe.grad_clip > 0:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    if opt.ema is not None:
        opt.ema.update(model)
    if recipe.after is not None:
        recipe.after()
    if len(chunks) == 1:
        return losses[0], outputs[0]
    return torch.stack(losses).sum(), torch.cat(outputs)


def _gradient_sync(forward: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for all but the last chunk of an accumulated step (their gradients
    stay local and are all-reduced once, with the last chunk's)."""
    ddp = getattr(forward, "_orig_mod", forward)  # under torch.compile
    if last or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def wrapped(
    model: torch.nn.Module, *, distributed: bool, device: torch.device, compiled: bool
) -> torch.nn.Module:
    """The module a step calls: DDP around the model under torchrun (rebuild it when the
    backbone freezes or thaws: DDP registers the parameters that need gradients when it is
    built), compiled when the compile policy says so."""
    module = model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if compiled:
        # The inductor's compiled kernels persist across runs in the user cache, not /tmp.
        from ..data import user_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(user_cache_dir() / "inductor"))
        module = torch.compile(module)
    return module


# --------------------------------------------------------------------------- model modes


def frozen_at(strategy: str, epoch: int, freeze_epochs: int) -> bool:
    """Whether the backbone is frozen in ``epoch``: always for linear, the first
    ``freeze_epochs`` for gradual."""
    return strategy == "linear" or (strategy == "gradual" and epoch < freeze_epochs)


def set_frozen(model: model_lib.Classifier, frozen: bool) -> None:
    """Freeze or thaw the backbone and set train mode: a frozen backbone keeps BatchNorm in
    eval mode, so its running statistics stay the ImageNet ones its weights were trained
    with."""
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen)
    model.train()
    if frozen:
        model.net.eval()
        model.head.train()


@contextlib.contextmanager
def at_size(model: model_lib.Classifier, size: int) -> Iterator[None]:
    """The model resizes its inputs to ``size`` px inside this block (progressive resizing,
    the budget's timing steps), and to its own resolution again after it."""
    own = model.preprocess.image_size
    model.preprocess.image_size = size
    try:
        yield
    finally:
        model.preprocess.image_size = own
