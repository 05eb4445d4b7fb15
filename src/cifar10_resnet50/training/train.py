"""The ``train`` command: fine-tune ResNet-50 on CIFAR-10 or a folder of images, on one device
or many (torchrun).

Read ``run()`` then ``_run()`` top to bottom: set-up (``_setup``, ``_build``), then a plain loop
over epochs (``_train_epoch`` → ``_train_step``; ``_end_epoch``), then the final evaluation.
What travels together lives in two objects: ``Run`` (model, optimizer, data, saver...) and
``checkpoint.RunState`` (position, best score, running sums). Resume is exact because all
randomness in the loop is keyed by (seed, epoch, batch) and everything else that changes
(weights, BatchNorm statistics, optimizer, scheduler, scaler, position) is saved.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import checkpoint, data
from .. import model as model_lib
from ..config import Config, parse_duration, resolve
from ..data import augment, cifar10
from ..errors import UserError
from ..evaluation import evaluate
from ..fileio import (
    append_line,
    ensure_writable_dir,
    remove_stale_temps,
    save_torch,
    write_bytes,
    write_json,
)
from ..runtime import Process, autocast, convert_sync_bn, pick_device, pick_precision
from . import budget
from .board import Board

log = logging.getLogger(__name__)

# Flags that may differ when resuming: they do not change what the run computes
# (epochs extends or shortens the schedule; the log says so).
# train.out: a run started without --out saved None; resuming names the folder it chose.
# data.data_dir, data.download: where the same CIFAR-10 files are found (their content is
# verified on every load), e.g. another machine's copy.
RESUMABLE_CHANGES = {
    "data.data_dir",
    "data.download",
    "train.epochs",
    "train.progress",
    "train.checkpoint_every",
    "train.compile",
    "train.threads",
    "train.tensorboard",
    "train.out",
}
LOG_EVERY = 10  # steps between host syncs (progress bar, NaN check); each sync stalls a GPU


# --------------------------------------------------------------------------- pieces


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


@contextlib.contextmanager
def at_size(model: model_lib.Classifier, size: int) -> Any:
    """The model resizes its inputs to ``size`` px inside this block (progressive resizing,
    the budget's timing steps), and to its own resolution again after it."""
    own = model.preprocess.image_size
    model.preprocess.image_size = size
    try:
        yield
    finally:
        model.preprocess.image_size = own


def set_backbone_frozen(model: model_lib.Classifier, frozen: bool) -> None:
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen)


def set_train_mode(model: model_lib.Classifier, frozen: bool) -> None:
    """Train mode, except a frozen backbone keeps BatchNorm in eval mode: its running
    statistics stay the ImageNet ones its weights were trained with."""
    model.train()
    if frozen:
        model.net.eval()
        model.head.train()


def frozen_at(strategy: str, epoch: int, freeze_epochs: int) -> bool:
    return strategy == "linear" or (strategy == "gradual" and epoch < freeze_epochs)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict[str, Any], requested: Config) -> list[str]:
    """Keys that differ between the saved and the requested config; error if any matters."""
    a, b = _flatten(saved), _flatten(requested.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        details = ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in blocking[:4])
        raise UserError(
            f"--resume continues a run with its own settings, but these differ ({details}). "
            "Drop those flags, or start a new run with another --out."
        )
    return changed


class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to stop at a step boundary; a second Ctrl-C (a second
    later or more) aborts at once.

    Stopping between steps, never inside one, is what lets the saved ``last`` be exact.
    SIGTERM counts too: torchrun forwards the launcher's Ctrl-C as a signal to every worker,
    and schedulers (Slurm, Kubernetes) stop jobs with SIGTERM.
    """

    def __init__(self) -> None:
        self.requested = False
        self._since = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT and time.monotonic() - self._since > 1:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._since = True, time.monotonic()
            log.warning(
                "interrupt: finishing this step, saving 'last', then stopping (Ctrl-C again aborts)"
            )

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _first_non_finite(losses: list[torch.Tensor], first_step: int) -> tuple[int, float] | None:
    """(step, value) of the first NaN/inf among the pending losses, or None. One host sync."""
    if not losses:
        return None
    values = torch.stack(losses).float()
    bad = torch.nonzero(~torch.isfinite(values)).flatten()
    if len(bad):
        return first_step + int(bad[0]), float(values[bad[0]])
    return None


def _non_finite_error(found: tuple[int, float] | None, steps_per_epoch: int) -> UserError:
    advice = "Lower --lr, raise --warmup, or use --precision fp32."
    if found is None:
        return UserError(f"another process's loss became NaN/inf; stopped without saving. {advice}")
    step, value = found
    return UserError(
        f"loss became {value} at step {step + 1} (epoch {step // steps_per_epoch + 1}, batch "
        f"{step % steps_per_epoch + 1}); stopped without saving. {advice}"
    )


@dataclasses.dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    last: Path
    best: Path | None
    best_val_acc: float | None
    epochs_done: int
    stopped_early: bool
    test: evaluate.EvalReport | None
    already_finished: bool = False  # --resume of a run that had done all its epochs


# --------------------------------------------------------------------------- compile policy

# Measured (issue 6, one H100, 160 px, batch 512): eager 7,483 img/s, compiled 10,726 (1.43×),
# first epoch with compilation 65 s. On this 2-core CPU the compiled step measured +12 % once
# (issue 2) and 0.68× eager in benchmarks/compile_cost.py (cold compile 76 s, warm-cache 5 s):
# no reliable gain, so `auto` never compiles on a CPU (speed-up 1.0); `--compile on` still does.
COMPILE_COST_S = {"cuda": 65.0, "cpu": 76.0}
COMPILE_SPEEDUP = {"cuda": 1.43, "cpu": 1.0}
TIMED_STEPS = 20  # eager steps timed before `--compile auto` decides


def compile_pays(device_type: str, seconds_per_step: float, steps_left: int) -> bool:
    """`--compile auto`: compile when the time it saves on the steps left exceeds its cost.
    With the inductor's on-disk cache warm, a second run of the same shapes costs less, so
    this rule is conservative for repeated runs."""
    saved = steps_left * seconds_per_step * (1 - 1 / COMPILE_SPEEDUP[device_type])
    return saved > COMPILE_COST_S[device_type]


def _compile(model: torch.nn.Module) -> torch.nn.Module:
    # The inductor's compiled kernels persist across runs in the user cache, not /tmp.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(data.user_cache_dir() / "inductor"))
    return torch.compile(model)


# --------------------------------------------------------------------------- one run's parts


@dataclasses.dataclass
class Run:
    """Everything a training run holds, built once by :func:`_build`."""

    cfg: Config
    process: Process
    device: torch.device
    amp_dtype: torch.dtype | None
    out: Path
    meta: dict[str, Any]
    model: model_lib.Classifier  # the bare model: saved, validated, evaluated
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    saver: checkpoint.Saver
    arrays: data.Arrays  # CPU copy, for the final test evaluation
    train_idx: torch.Tensor  # indices into arrays.train_x of the training split
    val_idx: torch.Tensor  # ... and of the validation split
    train_x: torch.Tensor  # uint8 [N,3,S,S] on the device (S: the stored size)
    train_y: torch.Tensor
    val_x: torch.Tensor  # this process's shard of the validation split (CPU)
    val_y: torch.Tensor
    steps_per_epoch: int
    compiled: bool = False
    compile_decided: bool = False  # `--compile auto` has made its one decision
    forward: torch.nn.Module | None = None  # the model as trained: DDP- and/or compile-wrapped
    frozen: bool | None = None  # the backbone state ``forward`` was built for
    plan: budget.Plan | None = None  # --budget's plan
    started: float = 0.0  # clock() when the command started (for --budget)
    # The run's clock (seconds) and what is called after each optimizer step, the loop's and
    # the budget timer's: tests pass a clock that advances per step, so the budget's promise
    # is checked exactly, whatever this machine's speed at that moment.
    clock: Callable[[], float] = time.perf_counter
    after_step: Callable[[], None] | None = None
    # [step, mean loss since the last sync, lr] at each host sync of the epoch (every
    # LOG_EVERY steps), for metrics.jsonl's "steps" and curves.png's per-step lines
    step_log: list[list[float]] = dataclasses.field(default_factory=list)

    def size_at(self, epoch: int) -> int:
        """Training resolution of an epoch (``--progressive``); always the model's own for
        validation and saving."""
        target = self.cfg.model.image_size
        if not self.cfg.train.progressive:
            return target
        return budget.progressive_sizes(target, self.cfg.train.epochs)[epoch]


def _setup(cfg: Config, resume: bool, process: Process) -> tuple[Config, Path, dict | None]:
    """Resolved config, run folder and the saved ``last.pt`` (when resuming)."""
    device = pick_device(cfg.train.device, process.local_rank)
    cfg = resolve(cfg, device.type, process.world_size)
    out = Path(cfg.train.out) if cfg.train.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if process.distributed and not cfg.train.out:
        # Every rank must agree on the folder; the minute may differ between them.
        raise UserError("with torchrun, pass --out RUN_DIR (every process must name one folder)")
    # The folder is part of the saved config, so the printed "--resume --out RUN" matches it.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(out)))
    if cfg.data.source == "cifar10" and cfg.data.data_dir is None:
        # Where the data was found ($CIFAR10_DATA_DIR, else the user cache) joins the run's
        # settings, so `--resume` from a shell without that variable still finds it.
        where = str(cifar10.resolve_data_dir(None))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=where))
    last = out / "last.pt"
    if not resume:
        if last.exists():
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return cfg, out, None
    if not last.exists():
        raise UserError(f"--resume: no {last}; pass --out to the run folder to resume")
    saved = checkpoint.load(last)
    for key in check_resume_config(saved["config"], cfg):
        log.info("resume: %s changed from the saved run", key)
    return cfg, out, saved


def load_data(cfg: Config, progress: bool) -> data.Arrays:
    d = cfg.data
    return data.load(
        d.source,
        data_dir=d.data_dir,
        download=d.download,
        store_size=d.store_size,
        test_size=d.test_size,
        strict=d.strict,
        progress=progress,
    )


def _model_meta(cfg: Config, arrays: data.Arrays, image_size: int | None = None) -> dict:
    """What the checkpoints say about the model: its classes and input size from the data,
    and where that data came from (so ``evaluate`` finds the same test set)."""
    source = {"source": arrays.source, "test_size": cfg.data.test_size}
    return model_lib.model_meta(
        cfg.model.weights,
        image_size or cfg.model.image_size,
        arrays.classes,
        arrays.image_size,
        data=source,
    )


def _splits(arrays: data.Arrays, train_idx: torch.Tensor, val_idx: torch.Tensor) -> dict:
    """Which images the run trains, validates and tests on (``splits.json``): file paths for a
    folder, indices into the 50,000 training images for CIFAR-10; and what was left out."""
    if not arrays.train_files:
        return {"source": arrays.source, "val": val_idx.tolist(), "test": "test_batch"}
    files = arrays.train_files
    return {
        "source": arrays.source,
        "classes": list(arrays.classes),
        "train": sorted(files[i] for i in train_idx.tolist()),
        "val": sorted(files[i] for i in val_idx.tolist()),
        "test": sorted(arrays.test_files),
        "left_out": list(arrays.left_out),
    }


def _build(cfg: Config, out: Path, process: Process) -> Run:
    """Model, data on the device, optimizer, schedule, run folder. Rank 0 downloads the
    weights and the data first; the others wait for it, then read its files."""
    t, o = cfg.train, cfg.optim
    device = pick_device(t.device, process.local_rank)
    data.check(cfg.data.source, cfg.data.data_dir)
    torch.manual_seed(t.seed)
    # The weights first: without a network they fail in seconds, before any data work.
    with process.main_first(f"download of the weights and {data.label(cfg.data.source)}"):
        backbone = model_lib.backbone_weights(cfg.model.weights, progress=t.progress)
        arrays = load_data(cfg, progress=t.progress and process.is_main)
    model = model_lib.build(
        cfg.model.weights, cfg.model.image_size, len(arrays.classes), backbone=backbone
    )
    train_idx, val_idx = arrays.split(cfg.data.val_size, t.seed, cfg.data.subset)
    steps = augment.steps_per_epoch(len(train_idx), t.batch_size, process.world_size)
    if t.steps_per_epoch is not None:
        steps = min(steps, t.steps_per_epoch)
    if steps == 0 and t.strategy != "linear":  # the probe fits on all images at once
        raise UserError(
            f"{len(train_idx)} training images make no full batch of {t.batch_size} × "
            f"{process.world_size} process(es); lower --batch-size or raise --subset"
        )
    shard = val_idx[process.rank :: process.world_size]
    if t.sync_bn and process.distributed:
        model = convert_sync_bn(model, device.type)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backbone_lr = o.lr * (o.backbone_lr_scale if cfg.model.weights != "none" else 1.0)
    groups = param_groups(model, o.lr, backbone_lr, o.weight_decay)
    if t.strategy == "linear":
        groups = [g for g in groups if g["name"].startswith("head")]
    optimizer = make_optimizer(groups, o.optimizer, o.momentum)
    scheduler = make_scheduler(optimizer, o.schedule, steps * t.epochs, o.warmup)
    amp_dtype = pick_precision(t.precision, device)
    meta = _model_meta(cfg, arrays)
    if process.is_main:  # only now: a failed start leaves no run folder behind
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # a save that was SIGKILLed leaves its temporary file
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "splits.json", _splits(arrays, train_idx, val_idx))
    return Run(
        cfg=cfg,
        process=process,
        device=device,
        amp_dtype=amp_dtype,
        out=out,
        meta=meta,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        saver=checkpoint.Saver(
            out, meta, cfg.to_dict(), is_main=process.is_main, world_size=process.world_size
        ),
        arrays=arrays,
        train_idx=train_idx,
        val_idx=val_idx,
        train_x=arrays.train_x[train_idx].to(device),
        train_y=arrays.train_y[train_idx].to(device),
        val_x=arrays.train_x[shard],
        val_y=arrays.train_y[shard],
        steps_per_epoch=steps,
        compiled=t.compile == "on",
    )


def _forward(r: Run, frozen: bool) -> torch.nn.Module:
    """The module the step calls: DDP around the model under torchrun (rebuilt when the
    backbone freezes or thaws: DDP registers the parameters that need gradients when it is
    built), compiled when the policy says so."""
    if r.forward is None or r.frozen != frozen:
        module: torch.nn.Module = r.model
        if r.process.distributed:
            ids = [r.device.index] if r.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        r.forward, r.frozen = (_compile(module) if r.compiled else module), frozen
    return r.forward


def _train_step(
    r: Run, forward: torch.nn.Module, xb: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the loss and logits, still on the device (no sync)."""
    o = r.cfg.optim
    if r.cfg.train.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with autocast(r.device, r.amp_dtype):
        logits = forward(xb)  # uint8 [B,3,S,S] → float [B,C]
    loss = F.cross_entropy(logits.float(), target, label_smoothing=o.label_smoothing)
    r.optimizer.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    if o.grad_clip > 0:
        r.scaler.unscale_(r.optimizer)
        torch.nn.utils.clip_grad_norm_(r.model.parameters(), o.grad_clip)
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.scheduler.step()
    if r.after_step is not None:
        r.after_step()
    return loss.detach(), logits.detach()


def _train_epoch(
    r: Run, state: checkpoint.RunState, stop: StopFlag, board: Board, stop_after: int | None
) -> bool:
    """Train from ``state``'s position to the end of the epoch; True if asked to stop (then
    ``last`` is saved). Host syncs happen every ``LOG_EVERY`` steps only: the progress bar,
    the NaN check and, under torchrun, the ranks' agreement on stopping."""
    from tqdm import tqdm

    t, a, process = r.cfg.train, r.cfg.augment, r.process
    frozen = frozen_at(t.strategy, state.epoch, t.freeze_epochs)
    set_backbone_frozen(r.model, frozen)
    set_train_mode(r.model, frozen)
    forward = _forward(r, frozen)
    bar = tqdm(
        total=r.steps_per_epoch,
        initial=state.batch,
        desc=f"epoch {state.epoch + 1}/{t.epochs}",
        unit="step",
        disable=not (t.progress and process.is_main),
        leave=False,
    )
    t0, seen0, pending, pending_from, timed_from = (
        r.clock(),
        state.sums["seen"],
        [],
        state.step,
        None,
    )
    for i, xb, yb, target in augment.train_batches(
        r.train_x,
        r.train_y,
        batch_size=t.batch_size,
        seed=t.seed,
        epoch=state.epoch,
        start=state.batch,
        padding=a.crop_padding,
        flip=a.flip,
        mixup=a.mixup,
        cutmix=a.cutmix,
        num_classes=r.meta["num_classes"],
        rank=process.rank,
        world_size=process.world_size,
        steps=r.steps_per_epoch,
    ):
        with at_size(r.model, r.size_at(state.epoch)):
            loss, logits = _train_step(r, forward, xb, target)
        state.step, state.batch = state.step + 1, i + 1
        # Running sums stay on the device: no host sync per step.
        pending.append(loss)
        state.sums["loss"] += loss * len(yb)
        state.sums["correct"] += (logits.argmax(1) == yb).sum()
        state.sums["seen"] += len(yb)
        bar.update(1)
        asked = stop_after is not None and state.step >= stop_after
        save_now = bool(t.checkpoint_every) and state.step % t.checkpoint_every == 0
        sync = state.step % LOG_EVERY == 0 or state.batch == r.steps_per_epoch or asked or save_now
        if not process.distributed:
            sync = sync or stop.requested  # alone, stop at once; ranks stop at a shared step
        if not sync:
            continue
        bad = _first_non_finite(pending, pending_from)
        any_bad, any_stop = process.any([bad is not None, stop.requested or asked], r.device)
        if any_bad:
            raise _non_finite_error(bad, r.steps_per_epoch)
        window = float(torch.stack(pending).float().mean())
        pending, pending_from = [], state.step
        rate = (state.sums["seen"] - seen0) * process.world_size / max(r.clock() - t0, 1e-9)
        bar.set_postfix(loss=f"{window:.3f}", img_s=f"{rate:.0f}", **_budget_eta(r, state))
        lr = r.scheduler.get_last_lr()[-1]
        board.step(state.step, window, lr, rate)
        r.step_log.append([state.step, round(window, 5), lr])
        timed_from = _maybe_compile(r, state, timed_from)
        if r.compiled and r.forward is not forward:
            forward = _forward(r, frozen)
        if any_stop or save_now:
            r.saver.save_last(r.model, r.optimizer, r.scheduler, r.scaler, state)
        if any_stop:
            bar.close()
            return True
    bar.close()
    return False


def _maybe_compile(r: Run, state: checkpoint.RunState, timed_from: tuple | None) -> tuple | None:
    """`--compile auto`: time the first eager steps, then compile if the rest repays it."""
    if r.cfg.train.compile != "auto" or r.compile_decided or timed_from == ():
        return ()
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)
    now = (r.clock(), state.step)
    if timed_from is None:
        return now  # start timing after the first sync (warm-up steps excluded)
    if state.step - timed_from[1] < TIMED_STEPS:
        return timed_from
    per_step = (now[0] - timed_from[0]) / (state.step - timed_from[1])
    left = r.steps_per_epoch * r.cfg.train.epochs - state.step
    decision = compile_pays(r.device.type, per_step, left)
    # Every rank must decide alike (a compiled and an eager DDP rank would still agree on
    # gradients, but their speeds would not): rank 0's timing decides.
    decision = r.process.any([decision and r.process.is_main], r.device)[0]
    log.info(
        "--compile auto: %.3f s/step eager, %d steps left → %s",
        per_step,
        left,
        "compiling" if decision else "staying eager (compiling would not pay)",
    )
    r.compile_decided = True
    if decision:
        r.compiled, r.forward = True, None
    return ()


# --------------------------------------------------------------------------- --budget


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_over_ranks(r: Run, value: float) -> float:
    """The mean of ``value`` over the processes: every rank then plans alike (the same
    float on each), so no rank takes a branch that holds a collective the others skip."""
    t = torch.tensor([value], dtype=torch.float64, device=r.device)
    return float(r.process.all_reduce(t)) / r.process.world_size


def _time_steps(r: Run, size: int, frozen: bool, deadline: float, timed: int = 8) -> float:
    """Seconds per optimizer step at ``size`` px: real steps of this run on its own augmented
    batches (mixup and CutMix included), timed after one warm-up step, then undone (weights,
    BatchNorm statistics, optimizer, schedule, scaler). As many timed steps as the warm-up
    step's time says fit before ``deadline`` (at least 1, at most ``timed``), the same
    number on every rank."""
    t, a = r.cfg.train, r.cfg.augment
    snapshot = copy.deepcopy(
        [m.state_dict() for m in (r.model, r.optimizer, r.scheduler, r.scaler)]
    )
    set_backbone_frozen(r.model, frozen)
    set_train_mode(r.model, frozen)
    forward = _forward(r, frozen)
    batches = itertools.chain.from_iterable(
        augment.train_batches(
            r.train_x, r.train_y, batch_size=t.batch_size, seed=t.seed, epoch=epoch,
            padding=a.crop_padding, flip=a.flip, mixup=a.mixup, cutmix=a.cutmix,
            num_classes=r.meta["num_classes"], rank=r.process.rank,
            world_size=r.process.world_size,
        )
        for epoch in itertools.count()
    )  # fmt: skip
    with at_size(r.model, size):
        _, xb, _, target = next(batches)
        t0 = r.clock()
        _train_step(r, forward, xb, target)  # a new shape pays its kernels' set-up here
        _sync(r.device)
        warm = max(r.clock() - t0, 1e-6)
        fits = _mean_over_ranks(r, (deadline - r.clock()) / warm)
        n = int(min(timed, max(1, fits)))
        t0 = r.clock()
        for _, xb, _, target in itertools.islice(batches, n):
            _train_step(r, forward, xb, target)
        _sync(r.device)
        seconds = (r.clock() - t0) / n
    for module, state in zip((r.model, r.optimizer, r.scheduler, r.scaler), snapshot, strict=True):
        module.load_state_dict(state)
    return _mean_over_ranks(r, seconds)


def _time_eval(
    r: Run, size: int, deadline: float, min_seconds: float = 1.0, max_batches: int = 8
) -> float:
    """Seconds per evaluated image at ``size`` px: evaluation batches timed after one of the
    same shape (a first batch of a new shape pays the kernels' set-up on a CPU), for at least
    ``min_seconds`` or ``max_batches`` batches (2 at least), or until ``deadline`` (1 at
    least). No collectives inside: ranks may time different counts."""
    bs = r.cfg.train.eval_batch_size
    images = r.arrays.test_x
    kwargs = dict(device=r.device, amp_dtype=r.amp_dtype, channels_last=r.cfg.train.channels_last)
    with at_size(r.model, size):
        evaluate.predict_logits(r.model, images[:bs], batch_size=bs, **kwargs)
        t0, n = r.clock(), 0
        for start in range(bs, min(len(images), bs * (max_batches + 1)), bs):
            evaluate.predict_logits(r.model, images[start : start + bs], batch_size=bs, **kwargs)
            n += len(images[start : start + bs])
            now = r.clock()
            if (n >= 2 * bs and now - t0 >= min_seconds) or now >= deadline:
                break
    return _mean_over_ranks(r, (r.clock() - t0) / max(1, n))


def _time_save(r: Run) -> float:
    """An epoch's bookkeeping, timed for real: last.pt (weights + the optimizer's state: SGD
    one copy more, AdamW two), best.pt (the weights), written atomically with fsync, and the
    TensorBoard figures (confusion matrix, image grid), each once into throwaway files. On a
    2-core CPU these took ~1.3 s per epoch: small against real epochs, not against a
    30-second budget's."""
    import shutil
    import tempfile

    seconds = 0.0
    if r.process.is_main:
        state = r.model.state_dict()
        copies = 2 if r.cfg.optim.optimizer == "sgd" else 3
        probe = r.out / ".budget-timing.pt"
        t0 = r.clock()
        save_torch({f"copy{i}": state for i in range(copies)}, probe)  # last.pt's size
        t1 = r.clock()
        save_torch({"model": state}, probe)  # best.pt's, written in about half the epochs
        seconds = (t1 - t0) + (r.clock() - t1) / 2
        probe.unlink(missing_ok=True)
        if r.cfg.train.tensorboard and len(r.val_x):
            folder = Path(tempfile.mkdtemp(prefix="budget-board-"))
            board = Board(folder)
            n = min(len(r.val_x), r.cfg.train.eval_batch_size)
            logits = torch.zeros(n, r.meta["num_classes"])
            board.predictions(0, r.val_x[:n], logits, r.val_y[:n], r.meta["classes"])
            t0 = r.clock()  # the second call: the first pays matplotlib's set-up
            board.predictions(1, r.val_x[:n], logits, r.val_y[:n], r.meta["classes"])
            seconds += r.clock() - t0
            board.close()
            shutil.rmtree(folder, ignore_errors=True)
    return _mean_over_ranks(r, seconds)


def _fits(r: Run, seconds: float, deadline: float) -> bool:
    """Whether timing that takes ~``seconds`` still fits before ``deadline``. Agreed, so every
    rank takes the same branch (timing steps hold collectives)."""
    return seconds <= _mean_over_ranks(r, deadline - r.clock())


def _step_timer(r: Run, deadline: float) -> Callable[[int, bool], float]:
    """Seconds per step at (size, frozen), measured once each. Planning may use the time up
    to ``deadline`` (a share of the budget): past it, a larger size's time is estimated from
    the largest one measured (:func:`budget.scaled`) instead of timed, so planning never
    eats the budget, whatever the data or batch size (a 2-minute budget on a 162-image
    folder once spent 6 minutes timing five sizes, then refused)."""
    steps: dict[tuple[int, bool], float] = {}

    def step_s(size: int, frozen: bool) -> float:
        if (size, frozen) not in steps:
            known = [s for s, f in steps if f == frozen]
            guess = known and budget.scaled(steps[(max(known), frozen)], max(known), size)
            if guess and not _fits(r, 3 * guess, deadline):  # warm-up + 2 timed steps
                log.info("budget: the %d px step time is estimated from %d px", size, max(known))
                steps[(size, frozen)] = guess
            else:
                steps[(size, frozen)] = _time_steps(r, size, frozen, deadline)
        return steps[(size, frozen)]

    return step_s


def _eval_timer(r: Run, deadline: float) -> Callable[[int], float]:
    """Seconds per evaluated image at a size, measured once each (estimated past
    ``deadline``, as :func:`_step_timer`)."""
    evals: dict[int, float] = {}

    def eval_s(size: int) -> float:
        if size not in evals:
            guess = evals and budget.scaled(evals[max(evals)], max(evals), size)
            batches = 3 * r.cfg.train.eval_batch_size  # warm-up + 2 timed batches
            fits = not guess or _fits(r, guess * batches, deadline)
            evals[size] = _time_eval(r, size, deadline) if fits else guess
        return evals[size]

    return eval_s


def _plan_budget(r: Run, auto_size: bool, final_eval: bool) -> Run:
    """Time real steps, plan epochs × steps (and the resolution when it is auto), and return
    the run rebuilt for the plan: its config (written to config.json, as if those flags had
    been given), schedule, checkpoints' metadata; the plan itself goes to plan.json."""
    t = r.cfg.train
    budget_s = parse_duration(t.budget)
    shape = budget.Shape(
        full_steps=augment.steps_per_epoch(len(r.train_idx), t.batch_size, r.process.world_size),
        global_batch=t.batch_size * r.process.world_size,
        val_images=len(r.val_x),
        test_images=len(r.arrays.test_x) if final_eval else 0,
        strategy=t.strategy,
        freeze_epochs=t.freeze_epochs,
        progressive=t.progressive,
        calibration_images=len(r.val_idx),
    )
    sizes = budget.LADDER[r.device.type] if auto_size else (r.cfg.model.image_size,)
    allowance = budget.planning_allowance(budget_s)
    log.info("budget %s: timing real steps to plan the run (≤ ~%.0f s)", t.budget, allowance)
    deadline = r.clock() + allowance
    timings = budget.Timings(_step_timer(r, deadline), _eval_timer(r, deadline), _time_save(r))

    def elapsed() -> float:
        return _mean_over_ranks(r, r.clock() - r.started)

    with contextlib.suppress(UserError):  # (the error, if any, comes next with the right set-up)
        budget.plan(budget_s, elapsed(), shape, timings, sizes)  # times what the plan needs
    # Again with the timing steps' own time counted: the timings are measured by now.
    plan = budget.plan(budget_s, elapsed(), shape, timings, sizes)
    if t.strategy == "gradual" and plan.epochs <= t.freeze_epochs:
        raise UserError(
            f"--budget {t.budget} leaves {plan.epochs} epoch(s), not one more than "
            f"--freeze-epochs {t.freeze_epochs}; raise the budget or lower --freeze-epochs"
        )
    log.info("%s", plan.describe())
    # `--compile auto` stays eager: a compile's cost (65 s on an H100) is not plannable.
    r = _replanned(r, plan.image_size, {"budget": t.budget, **dataclasses.asdict(plan), "eta_s": plan.eta_s},
                   epochs=plan.epochs, steps_per_epoch=plan.steps_per_epoch,
                   compile="off" if t.compile == "auto" else t.compile)  # fmt: skip
    scheduler = _rescheduled(r, plan.epochs * plan.steps_per_epoch)
    return dataclasses.replace(
        r, scheduler=scheduler, steps_per_epoch=plan.steps_per_epoch, plan=plan
    )


def _rescheduled(r: Run, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule for ``total_steps`` in all, at the current step: as built on resume from
    a config that had those epochs from the start."""
    o = r.cfg.optim
    scheduler = make_scheduler(r.optimizer, o.schedule, total_steps, o.warmup)
    scheduler.load_state_dict(r.scheduler.state_dict())  # the position (steps done)
    for group, base, factor in zip(
        r.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(scheduler.last_epoch)
    return scheduler


def _keep_to_budget(r: Run, state: checkpoint.RunState, epoch_s: float) -> Run:
    """``--budget`` on a machine slower than when it was planned (a busy CPU, a throttled
    card): after each epoch, if the epochs left — at the last epoch's measured speed — and
    the final evaluation would overrun the budget, drop the epochs that do not fit. The
    schedule is re-planned for the new total (cosine to 0 at the new end) and config.json
    and plan.json say so, so --resume follows. A run therefore ends within the budget plus
    at most one epoch (the one during which it slowed down). Never adds epochs."""
    p, epochs = r.plan, r.cfg.train.epochs
    if p is None or state.epoch >= epochs:
        return r
    epoch_s = _mean_over_ranks(r, epoch_s)
    slower = max(1.0, epoch_s / p.epoch_s[state.epoch - 1])
    left = p.budget_s - _mean_over_ranks(r, r.clock() - r.started) - p.final_s * slower
    keep = budget.epochs_that_fit(left, p.epoch_s[state.epoch : epochs], slower)
    if keep >= epochs - state.epoch:
        return r
    new = state.epoch + keep
    log.warning(
        "budget %s: epoch %d took %s, %.1f× its plan; %d epochs instead of %d, to end in time",
        budget.format_duration(p.budget_s), state.epoch, budget.format_duration(epoch_s),
        slower, new, epochs,
    )  # fmt: skip
    record = {"after_epoch": state.epoch, "epochs": new, "epoch_s": round(epoch_s, 2)}
    cfg = dataclasses.replace(r.cfg, train=dataclasses.replace(r.cfg.train, epochs=new))
    r = dataclasses.replace(r, cfg=cfg, scheduler=_rescheduled(r, new * r.steps_per_epoch))
    r.saver.config = cfg.to_dict()
    if r.process.is_main:
        write_json(r.out / "config.json", cfg.to_dict())
        _update_plan_file(r, lambda rec: rec.setdefault("replans", []).append(record))
    return r


def _update_plan_file(r: Run, change: Callable[[dict[str, Any]], Any]) -> None:
    path = r.out / "plan.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    change(record)
    write_json(path, record)


def _report_budget(r: Run) -> None:
    """Planned against actual, in the log and in plan.json (``actual_s``)."""
    if r.plan is None:
        return
    actual = r.clock() - r.started
    log.info(
        "budget %s: planned to end at ~%s, ended at %s (%+.0f%% of the budget)",
        budget.format_duration(r.plan.budget_s), budget.format_duration(r.plan.eta_s),
        budget.format_duration(actual), 100 * (actual / r.plan.budget_s - 1),
    )  # fmt: skip
    if r.process.is_main:
        _update_plan_file(r, lambda rec: rec.update(actual_s=round(actual, 2)))


def _plan_probe_budget(r: Run, auto_size: bool) -> Run:
    """``--strategy linear`` has no epochs to plan: the budget picks the resolution (the
    largest whose feature pass fits), or says in one line that none does."""
    t = r.cfg.train
    budget_s = parse_duration(t.budget)
    feature_images = (len(r.train_idx) + len(r.val_idx)) * (2 if t.probe_mirrors else 1)
    sizes = budget.LADDER[r.device.type] if auto_size else (r.cfg.model.image_size,)
    eval_s = _eval_timer(r, r.clock() + budget.planning_allowance(budget_s))
    size, estimate = budget.plan_probe(
        budget_s,
        lambda: _mean_over_ranks(r, r.clock() - r.started),
        feature_images,
        len(r.arrays.test_x) + len(r.val_idx),  # + the temperature's validation pass
        eval_s,
        sizes,
        budget.PROBE_FIT_S[r.device.type],
    )
    log.info(
        "budget %s: linear probe at %d px, ~%s",
        t.budget,
        size,
        budget.format_duration(estimate),
    )
    return _replanned(r, size, {"budget": t.budget, "image_size": size, "eta_s": estimate})


def _replanned(r: Run, image_size: int, plan: dict[str, Any], **train_changes: Any) -> Run:
    """The run with the planned settings in its config (written to config.json as if given as
    flags, so --resume follows the plan), model resolution and checkpoints' metadata; the plan
    itself goes to plan.json."""
    cfg = dataclasses.replace(
        r.cfg,
        model=dataclasses.replace(r.cfg.model, image_size=image_size),
        train=dataclasses.replace(r.cfg.train, budget=None, **train_changes),
    )
    r.model.preprocess.image_size = image_size
    meta = _model_meta(cfg, r.arrays, image_size)
    saver = checkpoint.Saver(
        r.out, meta, cfg.to_dict(), is_main=r.process.is_main, world_size=r.process.world_size
    )
    if r.process.is_main:
        write_json(r.out / "config.json", cfg.to_dict())
        write_json(r.out / "plan.json", plan)
    return dataclasses.replace(r, cfg=cfg, meta=meta, saver=saver)


def _budget_eta(r: Run, state: checkpoint.RunState) -> dict[str, str]:
    """The progress bar's "eta" against the budget: the plan's end, moved by how far the run
    is ahead of or behind the plan at this step."""
    if r.plan is None:
        return {}
    p = r.plan
    expected = p.elapsed_s + p.train_s * state.step / (p.epochs * p.steps_per_epoch)
    end = p.eta_s + (r.clock() - r.started) - expected
    return {"eta": f"{budget.format_duration(end)}/{budget.format_duration(p.budget_s)}"}


def _validate(r: Run) -> tuple[float | None, float | None, torch.Tensor | None]:
    """Validation loss and accuracy over all ranks' shards (and this rank's logits)."""
    if not len(r.val_idx):
        return None, None, None
    logits = evaluate.predict_logits(
        r.model,
        r.val_x,
        batch_size=r.cfg.train.eval_batch_size,
        device=r.device,
        amp_dtype=r.amp_dtype,
        channels_last=r.cfg.train.channels_last,
    )
    if len(r.val_y):
        loss_sum = F.cross_entropy(logits, r.val_y, reduction="sum").item()
        correct = float((logits.argmax(1) == r.val_y).sum())
    else:
        loss_sum, correct = 0.0, 0.0
    counts = torch.tensor([loss_sum, correct, len(r.val_y)], dtype=torch.float64, device=r.device)
    totals = r.process.all_reduce(counts).tolist()
    return totals[0] / totals[2], totals[1] / totals[2], logits


def _average_bn_buffers(r: Run) -> None:
    """Under torchrun, each rank's BatchNorm running statistics followed its own batches since
    DDP last broadcast rank 0's; average them (as timm's ``distribute_bn``), so that every
    rank validates and saves the same model. A no-op alone or with ``--sync-bn``."""
    if not r.process.distributed:
        return
    for name, buf in r.model.named_buffers():
        if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
            r.process.all_reduce(buf).div_(r.process.world_size)


def _end_epoch(
    r: Run, state: checkpoint.RunState, board: Board, seconds: float, seen0: float
) -> None:
    """Validate, append the metrics row, save ``last`` (and ``best`` if it improved)."""
    process = r.process
    _average_bn_buffers(r)
    sums = process.all_reduce(
        torch.stack(
            [
                torch.as_tensor(state.sums[k], dtype=torch.float64, device=r.device)
                for k in ("loss", "correct", "seen")
            ]
        )
    ).tolist()
    seen_here = (state.sums["seen"] - seen0) * process.world_size
    row = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": sums[0] / max(sums[2], 1),
        "train_acc": sums[1] / max(sums[2], 1),
        "val_loss": None,
        "val_acc": None,
        "lr": r.scheduler.get_last_lr()[-1],
        "seconds": round(seconds, 2),
        "img_per_s": round(seen_here / seconds, 1),
        "frozen_backbone": r.frozen,
        "steps": list(r.step_log),
    }
    r.step_log.clear()
    row["val_loss"], row["val_acc"], val_logits = _validate(r)
    if val_logits is not None and process.is_main and len(r.val_y):
        board.predictions(state.step, r.val_x, val_logits, r.val_y, r.meta["classes"])
    board.epoch(row)
    improved = row["val_acc"] is not None and (
        state.best_val_acc is None or row["val_acc"] > state.best_val_acc
    )
    if improved:
        state.best_val_acc = row["val_acc"]
    state.next_epoch()
    if process.is_main:
        append_line(r.out / "metrics.jsonl", json.dumps(row))
        r.saver.save_last(r.model, r.optimizer, r.scheduler, r.scaler, state)
        if improved:
            r.saver.save_best(r.model, row)
    val_text = (
        f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%"
        if row["val_acc"] is not None
        else "no val split"
    )
    log.info(
        "epoch %d/%d  train loss %.4f acc %.2f%%  %s  %.0f img/s  %.1f s%s",
        state.epoch,
        r.cfg.train.epochs,
        row["train_loss"],
        100 * row["train_acc"],
        val_text,
        row["img_per_s"],
        seconds,
        "  (best)" if improved else "",
    )


def _probe_features(r: Run) -> Any:
    """The backbone features of the training and validation images, from the cache when
    every key matches (see ``probe.cached_features``)."""
    from . import probe

    cfg = r.cfg
    return probe.cached_features(
        r.model,
        r.arrays,
        torch.cat([r.train_idx, r.val_idx]),
        key_parts={
            "weights": probe.weights_identity(cfg.model.weights, cfg.train.seed),
            "image_size": cfg.model.image_size,
            "precision": str(r.amp_dtype),
        },
        device=r.device,
        amp_dtype=r.amp_dtype,
        batch_size=cfg.train.eval_batch_size,
        flip=cfg.train.probe_mirrors,
    )


def _linear_probe(r: Run, state: checkpoint.RunState, final_eval: bool) -> TrainResult:
    """``--strategy linear``: cached backbone features, then the head fitted on them (see
    ``probe``); the result is a normal run folder whose checkpoints hold the whole model."""
    from . import probe

    if r.process.distributed:
        raise UserError(
            "--strategy linear fits the head on cached features in one process (seconds after "
            "the features); run it without torchrun"
        )
    cfg, t0 = r.cfg, time.perf_counter()
    features = _probe_features(r)
    rows = features.rows(r.train_idx)
    has_val = len(r.val_idx) > 0
    t_fit = time.perf_counter()
    head = probe.fit_head(
        features.plain[rows],
        r.arrays.train_y[r.train_idx],
        features.plain[features.rows(r.val_idx)] if has_val else None,
        r.arrays.train_y[r.val_idx] if has_val else None,
        r.meta["num_classes"],
        cfg.train.probe_solver,
        # each mirror image is one more training example
        mirrored_x=None if features.flipped is None else features.flipped[rows],
    )
    fit_seconds = time.perf_counter() - t_fit
    with torch.no_grad():
        r.model.net.fc.weight.copy_(head.weight.to(r.model.net.fc.weight.device))
        r.model.net.fc.bias.copy_(head.bias.to(r.model.net.fc.bias.device))
    seconds = time.perf_counter() - t0
    row = {
        "epoch": cfg.train.epochs,
        "step": 0,
        "train_loss": head.train_loss,
        "train_acc": head.train_acc,
        "val_loss": head.val_loss,
        "val_acc": head.val_acc,
        "lr": None,
        "seconds": round(seconds, 2),
        "img_per_s": round(len(r.train_idx) / seconds, 1),
        "frozen_backbone": True,
        "probe": {
            "l2": head.l2,
            "solver": cfg.train.probe_solver,
            "fit_seconds": round(fit_seconds, 2),
            "features_from_cache": features.cached,
        },
    }
    log.info(
        "linear probe: L2 %.0e, train acc %.2f%%, %s in %.1f s (features %s)",
        head.l2,
        100 * head.train_acc,
        "no val split" if head.val_acc is None else f"val acc {100 * head.val_acc:.2f}%",
        seconds,
        "from the cache" if features.cached else "computed and cached",
    )
    state.epoch, state.best_val_acc = cfg.train.epochs, head.val_acc
    append_line(r.out / "metrics.jsonl", json.dumps(row))
    r.saver.save_last(r.model, r.optimizer, r.scheduler, r.scaler, state)
    if has_val:
        r.saver.save_best(r.model, row)
    _calibrate(r)
    report = _final_evaluation(r) if final_eval else None
    best = r.saver.best if r.saver.best.exists() else None
    return TrainResult(r.out, r.saver.last, best, head.val_acc, state.epoch, False, report)


def _calibrate(r: Run) -> None:
    """Temperature scaling (Guo et al. 2017) of the weights best.pt holds, fitted on the whole
    validation split: stored in best.pt's metadata and set on the model in memory, so the
    final evaluation, predict, serve and exports return calibrated probabilities."""
    from ..evaluation import calibration

    if not len(r.val_idx) or not r.saver.best.exists():
        return  # no held-out images: the model stays uncalibrated (temperature 1)
    if r.saver.best_state is None:  # resumed after best.pt was written
        blob = checkpoint.load(r.saver.best)
        r.saver.best_state, r.saver.best_row = blob["model"], blob.get("metrics", {})
    r.model.load_state_dict(r.saver.best_state)
    r.model.temperature.fill_(1.0)
    logits = evaluate.predict_logits(
        r.model,
        r.arrays.train_x[r.val_idx],
        batch_size=r.cfg.train.eval_batch_size,
        device=r.device,
        amp_dtype=r.amp_dtype,
        channels_last=r.cfg.train.channels_last,
    )
    labels = r.arrays.train_y[r.val_idx]
    t = calibration.fit_temperature(logits, labels)
    before, after = calibration.scores(logits, labels), calibration.scores(logits, labels, t)
    log.info(
        "temperature scaling on %d validation images: T = %.3f, ECE %.2f%% → %.2f%%, "
        "NLL %.4f → %.4f",
        len(labels), t, 100 * before["ece"], 100 * after["ece"], before["nll"], after["nll"],
    )  # fmt: skip
    r.saver.calibrate(t)
    r.meta = r.saver.meta
    r.model.temperature.fill_(t)


def _final_evaluation(r: Run) -> evaluate.EvalReport:
    """The test report of ``best`` (else ``last``), with the model and data already in memory:
    only the best epoch's weights are read back (from the copy kept when it was saved)."""
    best = r.saver.best if r.saver.best.exists() else None
    if best is not None:
        state = r.saver.best_state or checkpoint.load(best)["model"]
        r.model.load_state_dict(state)
    return evaluate.evaluate_model(
        r.model,
        list(r.meta["classes"]),
        r.arrays.test_x,
        r.arrays.test_y,
        out_dir=ensure_writable_dir(r.out / "eval"),
        source=best or r.saver.last,
        device=r.device,
        amp_dtype=r.amp_dtype,
        batch_size=r.cfg.train.eval_batch_size,
    )


# --------------------------------------------------------------------------- the command


def run(
    cfg: Config,
    *,
    resume: bool = False,
    final_eval: bool = True,
    stop_after_steps: int | None = None,
    process: Process | None = None,
    started: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train as ``cfg`` says; returns where the checkpoints are and the final test report.

    ``stop_after_steps`` stops (and saves ``last``) exactly as Ctrl-C does, after that many
    optimizer steps in total: the tests use it to interrupt a run deterministically. Under
    torchrun the process group is set up from the environment and closed at the end.
    ``started``: the ``clock()`` that ``--budget`` counts from (the CLI passes its own start,
    so importing torch counts too). ``clock`` (seconds) and ``after_step`` (called after each
    optimizer step) let a test run the budget on a clock of its own.
    """
    started = clock() if started is None else started  # --budget counts from here
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    own = process is None
    process = process or Process.from_env(pick_device(cfg.train.device).type)
    try:
        timing = {"started": started, "clock": clock, "after_step": after_step}
        return _run(cfg, resume, final_eval, stop_after_steps, process, timing)
    finally:
        if own:
            process.close()


def _start(
    cfg: Config,
    out: Path,
    process: Process,
    saved: dict | None,
    timing: dict[str, Any],
    auto_size: bool,
    final_eval: bool,
) -> tuple[Run, checkpoint.RunState]:
    """The built run (planned, under --budget) and its position (restored, when resuming)."""
    new_folder = not out.exists()
    r = dataclasses.replace(_build(cfg, out, process), **timing)
    if cfg.train.budget and saved is None:
        try:
            if cfg.train.strategy == "linear":
                r = _plan_probe_budget(r, auto_size)
            else:
                r = _plan_budget(r, auto_size, final_eval)
        except UserError:
            if process.is_main:  # a refused budget leaves nothing behind
                _remove_run_files(out, new_folder)
            raise
    state = checkpoint.RunState()
    if saved is not None:
        state = r.saver.restore(saved, r.model, r.optimizer, r.scheduler, r.scaler)
        log.info(
            "resuming %s at epoch %d, batch %d (step %d)", out, state.epoch + 1, state.batch,
            state.step,
        )  # fmt: skip
        if process.is_main:
            _truncate_metrics(out / "metrics.jsonl", state.epoch)
    log.info("%s", _describe(r))
    return r, state


def _describe(r: Run) -> str:
    """The run in one line, as it will go: the probe has no epochs or steps to show."""
    t = r.cfg.train
    precision = str(r.amp_dtype).replace("torch.", "") if r.amp_dtype else "fp32"
    images = f"{len(r.train_x)} train / {len(r.val_x) * r.process.world_size} val images"
    if t.strategy == "linear":
        return (
            f"linear probe of resnet50 on {r.device} ({precision}), {r.cfg.model.image_size} px: "
            f"backbone features once (cached), then the head fitted by {t.probe_solver}; "
            f"weights {r.meta['weights']}, {images} → {r.out}"
        )
    progressive = f" (progressive from {r.size_at(0)} px)" if t.progressive else ""
    world = r.process.world_size
    return (
        f"training resnet50 on {r.device} ({precision}), {r.cfg.model.image_size} px"
        f"{progressive}, strategy {t.strategy}, {t.epochs} epochs × {r.steps_per_epoch} steps, "
        f"batch {t.batch_size} × {world} process(es) = {t.batch_size * world}, weights "
        f"{r.meta['weights']}, {images} → {r.out}"
    )


def _run(
    cfg: Config,
    resume: bool,
    final_eval: bool,
    stop_after: int | None,
    process: Process,
    timing: dict[str, Any],
) -> TrainResult:
    auto_size = cfg.model.image_size is None  # --budget may choose it
    cfg, out, saved = _setup(cfg, resume, process)
    if saved is not None and saved["train_state"]["epoch"] >= cfg.train.epochs:
        done = saved["train_state"]["epoch"]
        log.info("%s finished all %d epochs; nothing to do", out, done)
        best = out / "best.pt" if (out / "best.pt").exists() else None
        ts = saved["train_state"]
        return TrainResult(out, out / "last.pt", best, ts["best_val_acc"], done, False, None, True)
    r, state = _start(cfg, out, process, saved, timing, auto_size, final_eval)
    cfg, t = r.cfg, r.cfg.train  # as planned by --budget
    if t.strategy == "linear":
        return _linear_probe(r, state, final_eval)
    board = Board(
        out / "tensorboard" if t.tensorboard and process.is_main else None, start_step=state.step
    )
    stopped = False
    try:
        with StopFlag() as stop:
            while state.epoch < r.cfg.train.epochs and not stopped:  # --budget may shorten
                t0, seen0 = r.clock(), float(state.sums["seen"])
                stopped = _train_epoch(r, state, stop, board, stop_after)
                if stopped:
                    log.warning(
                        "stopped at epoch %d, batch %d; '--resume --out %s' continues",
                        state.epoch + 1,
                        state.batch,
                        out,
                    )
                    break
                _end_epoch(r, state, board, r.clock() - t0, seen0)
                r = _keep_to_budget(r, state, r.clock() - t0)
    finally:
        board.close()
    report = None
    if not stopped and process.is_main:
        _calibrate(r)
        report = _final_evaluation(r) if final_eval else None
    rows = _read_metrics(out / "metrics.jsonl")
    if process.is_main and rows:
        from ..evaluation.plots import training_curves

        training_curves(rows, out / "curves.png", _curves_title(out, rows, report))
    best = r.saver.best if r.saver.best.exists() else None
    if not stopped:
        _report_budget(r)
    return TrainResult(out, r.saver.last, best, state.best_val_acc, state.epoch, stopped, report)


def _curves_title(out: Path, rows: list[dict[str, Any]], report: Any) -> str:
    """Run name, best epoch (by validation accuracy) and the final test accuracy, if known."""
    parts = [out.name]
    val = [r for r in rows if r.get("val_acc") is not None]
    if val:
        best = max(val, key=lambda r: r["val_acc"])
        parts.append(f"best epoch {best['epoch']} (val {100 * best['val_acc']:.2f}%)")
    if report is not None:
        parts.append(f"test {100 * report.metrics['accuracy']:.2f}%")
    return " — ".join(parts)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A torn last line (a kill mid-append) is dropped with a
    warning: it belongs to an epoch that was not saved, which a resumed run redoes."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: dropping a torn last line (an interrupted write)", path)
                break
            raise UserError(
                f"{path}: line {number} is not JSON; the file was edited or damaged. "
                "Remove that line to resume."
            ) from None
    return rows


def _remove_run_files(out: Path, new_folder: bool) -> None:
    """What a run that never started wrote: its folder if it made it, else its own files."""
    import shutil

    if new_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in ("config.json", "splits.json", "plan.json", ".budget-timing.pt"):
        (out / name).unlink(missing_ok=True)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows of epochs that the resumed run will redo (written after the last save)."""
    rows = [r for r in _read_metrics(path) if r["epoch"] <= epochs_done]
    if path.exists():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        write_bytes(path, text.encode("utf-8"))
