"""What a training run holds (:class:`Trainer`), built once from the resolved settings by
:func:`build`. The loop owns it and changes it in place (its position lives apart, in
``checkpoint.RunState``, which is what ``last.pt`` saves); ``--budget``'s planning changes its
settings, schedule and resolution in place before the first step, and its re-planning after
an epoch. Nothing copies it."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, data, runtime
from .. import model as model_lib
from ..config import Config, step_batch
from ..data import augment
from ..errors import UserError
from ..evaluation import evaluate
from ..fileio import remove_stale_temps, write_json
from ..runtime import Process, convert_sync_bn, pick_precision
from . import budget, core
from .compile_policy import CompilePolicy, Work

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Split:
    """The run's images: all of them on the CPU (the test set for the final evaluation) and
    which of the training images it trains and validates on."""

    arrays: data.Arrays
    train_idx: torch.Tensor  # indices into arrays.train_x of the training split
    val_idx: torch.Tensor  # ... and of the validation split (all of it, every rank)
    val_x: torch.Tensor  # this process's shard of the validation split, uint8 (CPU)
    val_y: torch.Tensor


@dataclasses.dataclass
class Trainer:
    """Everything a training run holds; see the module's docstring for who changes what."""

    cfg: Config  # resolved; as planned, under --budget
    process: Process
    device: torch.device
    amp_dtype: torch.dtype | None
    out: Path
    meta: dict[str, Any]  # the checkpoints' model_meta
    model: model_lib.Classifier  # the bare model: saved, validated, evaluated
    opt: core.Optimization
    recipe: core.StepRecipe
    batches: core.Batches  # the training split on the device, and how epochs draw from it
    split: Split
    saver: checkpoint.Saver
    compile: CompilePolicy
    clock: Callable[[], float] = time.perf_counter  # seconds; tests pass one of their own
    started: float = 0.0  # clock() when the command started (--budget counts from it)
    plan: budget.Plan | None = None  # --budget's plan
    forward: torch.nn.Module | None = None  # the model as stepped: DDP- and/or compile-wrapped
    frozen: bool | None = None  # the backbone state ``forward`` was built for

    @property
    def steps_per_epoch(self) -> int:
        assert self.batches.steps is not None, "build() sets the steps per epoch"
        return self.batches.steps

    def size_at(self, epoch: int) -> int:
        """Training resolution of an epoch (``--progressive``); always the model's own for
        validation and saving."""
        target, t = self.cfg.model.image_size, self.cfg.train
        return budget.progressive_sizes(target, t.epochs)[epoch] if t.progressive else target

    def work(self, epoch: int = 0, batch: int = 0) -> list[Work]:
        """The steps left from (``epoch``, ``batch``), by epoch: what compiling would cover."""
        return run_work(self.cfg, self.steps_per_epoch, epoch, batch)

    def prepare(self, frozen: bool, *, eager: bool = False) -> torch.nn.Module:
        """Freeze or thaw the backbone, set train mode and return the module to step: the
        wrapped model is rebuilt when the backbone's state or the compile policy changed.
        ``eager``: a module that never compiles, whatever the policy (--budget's timing)."""
        core.set_frozen(self.model, frozen)
        if eager:
            return core.wrapped(
                self.model, distributed=self.process.distributed, device=self.device,
                compiled=False,
            )  # fmt: skip
        if self.forward is None or self.frozen != frozen or self.compile.changed:
            self.forward = core.wrapped(
                self.model, distributed=self.process.distributed, device=self.device,
                compiled=self.compile.compiled,
            )  # fmt: skip
            self.frozen, self.compile.changed = frozen, False
        return self.forward

    def logits(self, images: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """``model``'s logits (default: the trained model's) for uint8 images (CPU), batched
        as the run evaluates."""
        return evaluate.predict_logits(
            self.model if model is None else model, images, batch_size=self.cfg.train.eval_batch_size, device=self.device,
            amp_dtype=self.amp_dtype, channels_last=self.cfg.train.channels_last,
        )  # fmt: skip

    def mean_over_ranks(self, value: float) -> float:
        """The mean of ``value`` over the processes: every rank then plans alike (the same
        float on each), so no rank takes a branch that holds a collective the others skip."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.process.all_reduce(t)) / self.process.world_size

    def set_config(self, cfg: Config) -> None:
        """New settings (a plan): into the checkpoints and config.json, so --resume follows."""
        self.cfg = cfg
        self.saver.config = cfg.to_dict()
        if self.process.is_main:
            write_json(self.out / "config.json", cfg.to_dict())


def run_folder(out: str | Path | None) -> Path:
    """The run's folder: ``out``, or ``runs/<date-time>``."""
    return Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run_work(cfg: Config, steps: int, epoch: int = 0, batch: int = 0) -> list[Work]:
    """Each epoch's steps from (``epoch``, ``batch``) on, with its resolution (``--progressive``)
    and backbone state (``--strategy gradual``); none before ``--budget`` has planned them."""
    t = cfg.train
    if t.epochs is None or cfg.model.image_size is None:
        return []
    sizes = (
        budget.progressive_sizes(cfg.model.image_size, t.epochs)
        if t.progressive
        else [cfg.model.image_size] * t.epochs
    )
    return [
        Work(
            sizes[e],
            core.frozen_at(t.strategy, e, t.freeze_epochs),
            steps - (batch if e == epoch else 0),
        )
        for e in range(epoch, t.epochs)
    ]


def compile_policy(cfg: Config, device_type: str, steps: int) -> CompilePolicy:
    """The run's ``--compile`` policy, for the graphs its epochs need."""
    t = cfg.train
    return CompilePolicy.from_setting(
        t.compile, device_type, run_work(cfg, steps), sync_bn=t.sync_bn
    )


def load_data(cfg: Config, progress: bool) -> data.Arrays:
    d = cfg.data
    return data.load(
        d.source, data_dir=d.data_dir, download=d.download, store_size=d.store_size,
        test_size=d.test_size, strict=d.strict, progress=progress,
    )  # fmt: skip


def model_meta(cfg: Config, arrays: data.Arrays) -> dict:
    """What the checkpoints say about the model: its classes and input size from the data,
    and where that data came from (so ``evaluate`` finds the same test set)."""
    source = {"source": arrays.source, "test_size": cfg.data.test_size}
    return model_lib.model_meta(
        cfg.model.weights, cfg.model.image_size, arrays.classes, arrays.image_size, data=source,
        arch=cfg.model.arch,
    )  # fmt: skip


def steps_per_epoch(cfg: Config, train_images: int, world_size: int) -> int:
    t = cfg.train
    steps = augment.steps_per_epoch(train_images, step_batch(t), world_size)
    if t.steps_per_epoch is not None:
        steps = min(steps, t.steps_per_epoch)
    if steps == 0 and t.strategy != "linear":  # the probe fits on all images at once
        raise UserError(
            f"{train_images} training images make no full step of {step_batch(t)} × "
            f"{world_size} process(es); lower --batch-size (or --accum-steps) or raise --subset"
        )
    return steps


def build(
    cfg: Config,
    out: Path,
    process: Process,
    *,
    clock: Callable[[], float] = time.perf_counter,
    started: float = 0.0,
    after_step: Callable[[], None] | None = None,
) -> Trainer:
    """Model, data on the device, optimizer, schedule, run folder. Rank 0 downloads the
    weights and the data first; the others wait for it, then read its files."""
    t = cfg.train
    device = process.device(t.device)
    data.check(cfg.data.source, cfg.data.data_dir)
    torch.manual_seed(t.seed)
    # The weights first: without a network they fail in seconds, before any data work.
    with process.main_first(f"download of the weights and {data.label(cfg.data.source)}"):
        backbone = model_lib.backbone_weights(
            cfg.model.weights, cfg.model.arch, t.progress, cfg.model.image_size
        )
        arrays = load_data(cfg, progress=t.progress and process.is_main)
    model = model_lib.build(
        cfg.model.weights, cfg.model.image_size, len(arrays.classes), backbone=backbone,
        arch=cfg.model.arch,
    )  # fmt: skip
    train_idx, val_idx = arrays.split(cfg.data.val_size, t.seed, cfg.data.subset)
    steps = steps_per_epoch(cfg, len(train_idx), process.world_size)
    shard = val_idx[process.rank :: process.world_size]
    if t.sync_bn and process.distributed:
        model = convert_sync_bn(model, process.backend)
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = pick_precision(t.precision, device)
    opt = core.Optimization.build(
        model, cfg.optim, pretrained=cfg.model.weights != "none",
        head_only=t.strategy == "linear", total_steps=steps * t.epochs, amp_dtype=amp_dtype,
        device_type=device.type, ema=t.ema,
    )  # fmt: skip
    meta = model_meta(cfg, arrays)
    split = Split(arrays, train_idx, val_idx, arrays.train_x[shard], arrays.train_y[shard])
    if process.is_main:  # only now: a failed start leaves no run folder behind
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # a save that was SIGKILLed leaves its temporary file
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "splits.json", _splits(split))
    return Trainer(
        cfg=cfg, process=process, device=device, amp_dtype=amp_dtype, out=out, meta=meta,
        model=model, opt=opt,
        recipe=step_recipe(
            cfg, device, amp_dtype, weights_for(cfg, arrays, train_idx, device), after_step
        ),
        batches=_batches(cfg, arrays, train_idx, device, process, steps),
        split=split,
        saver=checkpoint.Saver(
            out, meta, cfg.to_dict(), is_main=process.is_main, world_size=process.world_size
        ),
        compile=compile_policy(cfg, device.type, steps),
        clock=clock, started=started,
    )  # fmt: skip


def _batches(
    cfg: Config,
    arrays: data.Arrays,
    rows: torch.Tensor,
    device: torch.device,
    process: Process,
    steps: int,
) -> core.Batches:
    """The training rows of ``arrays`` where training draws them from, and how."""
    t = cfg.train
    return core.Batches(
        *_training_images(arrays, rows, device, t.batch_size, cfg.model.image_size),
        batch_size=step_batch(t), seed=t.seed, augment=cfg.augment,
        num_classes=len(arrays.classes), rank=process.rank, world_size=process.world_size,
        steps=steps, device=device, balanced=t.balanced_sampling,
    )  # fmt: skip


def _training_images(
    arrays: data.Arrays, rows: torch.Tensor, device: torch.device, batch: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, training rows) where training draws batches from: on the device when
    they fit beside a step (moved whole, no host copy first), else in pinned host memory."""
    x, y = arrays.train_x, arrays.train_y
    if runtime.images_fit_on(device, x.nbytes, batch, image_size):
        return x.to(device), y.to(device), rows.to(device)
    log.warning(
        "the training images (%.1f GiB) do not fit on the GPU beside a step: they stay in "
        "pinned host memory and each batch is copied (slower; a smaller --store-size fits)",
        x.nbytes / 2**30,
    )
    return x.pin_memory(), y.pin_memory(), rows


def step_recipe(
    cfg: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    class_weights: torch.Tensor | None = None,
    after: Callable[[], None] | None = None,
) -> core.StepRecipe:
    """How the run's steps compute, from its settings (the loop's, lr-find's, the timer's);
    ``class_weights``: the loss's, float [C] on ``device`` (:func:`weights_for`)."""
    return core.StepRecipe(
        device=device,
        amp_dtype=amp_dtype,
        label_smoothing=cfg.optim.label_smoothing,
        grad_clip=cfg.optim.grad_clip,
        channels_last=cfg.train.channels_last,
        accum_steps=cfg.train.accum_steps,
        class_weights=class_weights,
        after=after,
    )


def weights_for(
    cfg: Config, arrays: data.Arrays, rows: torch.Tensor, device: torch.device
) -> torch.Tensor | None:
    """``--class-weights auto``: float [C] = N / (C · n_c) over the training rows (scikit-
    learn's "balanced"; 1 for every class of a balanced set); None for ``none``."""
    if cfg.train.class_weights == "none":
        return None
    labels = arrays.train_y[rows]
    counts = torch.bincount(labels, minlength=len(arrays.classes)).double()
    weights = len(labels) / (len(counts) * counts.clamp(min=1))
    log.info("class weights: %s", ", ".join(f"{w:.2f}" for w in weights.tolist()))
    return weights.float().to(device)


def _splits(split: Split) -> dict:
    """Which images the run trains, validates and tests on (``splits.json``): file paths for a
    folder, indices into the 50,000 training images for CIFAR-10; and what was left out."""
    arrays, train_idx, val_idx = split.arrays, split.train_idx, split.val_idx
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
