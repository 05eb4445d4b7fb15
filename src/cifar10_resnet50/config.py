"""The one typed source of every default.

A run's configuration is built in three layers, later ones winning:
``Config()`` defaults → an optional config file (TOML or JSON, same sections) → CLI flags.
Fields that are ``None`` mean "auto" and are filled in by :func:`resolve` once the device is
known (GPU and CPU want different resolutions and epoch counts). The *resolved* config is
what gets written into the run folder and into every checkpoint.

This module imports no torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .declare import flags, setting
from .errors import UserError
from .options import data_dir_setting, device_setting, test_images_setting
from .rules import (  # noqa: F401 (re-exported: config.resolve, config.STRATEGIES, ...)
    AUGMENT_POLICIES,
    CLASS_WEIGHTS,
    COMPILE,
    DEVICES,
    OPTIMIZERS,
    PRECISIONS,
    PROBE_SOLVERS,
    SCHEDULES,
    STRATEGIES,
    TRACKERS,
    WEIGHTS,
    default_image_size,
    parse_duration,
    patch_size,
    resolve,
    scaled_lr,
    step_batch,
    uses_tensorboard,
    validate,
)


@dataclass(frozen=True)
class DataConfig:
    source: str = setting(
        "cifar10",
        "--data",
        "cifar10, or your own images: folder:PATH (PATH/<class>/*.jpg, or PATH/train/ and "
        "PATH/test/ [and PATH/val/] of that shape) or csv:FILE (a header row, then path,label "
        "rows [,split]; paths relative to the file)",
        metavar="SOURCE",
    )
    data_dir: str | None = data_dir_setting()
    # Download the official archive when the folder has no data (md5-verified, never silent).
    download: bool = setting(True, "--no-download", "fail instead of downloading CIFAR-10")
    # Images are stored at the model's resolution: every pixel the model will see is kept, and
    # nothing more (10,000 photos at 160 px are 768 MB of uint8 on the device).
    store_size: int | None = setting(
        None,
        "--store-size",
        "folder: images are stored PX×PX (centred square, Lanczos), the model's input size "
        "(default --image-size, else the device's default resolution)",
        metavar="PX",
    )
    # Held out with a fixed seed, so it is the same test set for every run on that content.
    test_size: int | None = setting(
        None,
        "--test-size",
        "folder without test/: images held out as the test set (stratified, fixed seed; "
        "default a tenth)",
        metavar="N",
    )
    strict: bool = setting(
        False, "--strict", "folder: stop at a bad file or class instead of leaving it out"
    )
    # Stratified, seeded hold-out from the training images, used for model selection.
    val_size: int | None = setting(
        None,
        "--val-size",
        "stratified validation hold-out for choosing best.pt (default a tenth of the training "
        "images: 5,000 for CIFAR-10, or of --subset); 0 = none",
        metavar="N",
    )
    subset: int | None = setting(
        None, "--subset", "train on the first N training images only (quick runs)", metavar="N"
    )


@dataclass(frozen=True)
class ModelConfig:
    # ResNet-50 is the point of the project; the others are there to compare before choosing.
    arch: str = setting(
        "resnet50",
        "--arch",
        "any torchvision classification model: resnet18/34/50/101/152, wide_resnet50_2, "
        "resnext50_32x4d, convnext_tiny, efficientnet_v2_s, vit_b_16, ... (BENCHMARKS.md "
        "compares them)",
        metavar="NAME",
    )
    weights: str = setting(
        "imagenet",
        "--weights",
        "imagenet (the architecture's best torchvision weights; ResNet-50: IMAGENET1K_V2) | "
        "imagenet-v1 | none | PATH: a torchvision .pth of --arch, or a checkpoint of ours (its "
        "backbone: fine-tune after a linear probe)",
        metavar="W",
    )
    # BiT-HyperRule resizes small images to 160 px (160–224 is the known-good range); 64 px
    # on a CPU gives an epoch in minutes instead of hours.
    image_size: int | None = setting(
        None,
        "--image-size",
        "resolution the stored images are resized to inside the model (default: 160 on a GPU, "
        "64 on a CPU)",
        metavar="PX",
    )


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = setting("sgd", "--optimizer", "sgd (Nesterov) or adamw", choices=OPTIMIZERS)
    # Scaled with the batch size: linear for SGD (Goyal et al. 2017, with the warm-up below),
    # square root for AdamW; 0.1 / 1e-3 at batch 128.
    lr: float | None = setting(
        None,
        "--lr",
        "peak lr of the head (default: SGD 0.1, AdamW 1e-3 at batch 128, scaled to the batch "
        "size: linearly for SGD, by its square root for AdamW)",
    )
    # Discriminative fine-tuning (fastai; Kornblith et al. 2019). 1.0 when training from scratch.
    backbone_lr_scale: float = setting(
        0.1, "--backbone-lr-scale", "backbone lr = lr × X for pretrained weights", metavar="X"
    )
    momentum: float = setting(0.9, "--momentum", "SGD momentum")
    weight_decay: float | None = setting(
        None,
        "--weight-decay",
        "default SGD 5e-4, AdamW 0.05; never on BatchNorm or biases",
        metavar="WD",
    )
    schedule: str = setting(
        "cosine", "--schedule", "cosine (after warm-up) or onecycle", choices=SCHEDULES
    )
    # Protects pretrained features from the large gradients of the new head's first steps.
    warmup: float = setting(
        0.05, "--warmup", "linear warm-up as a fraction of all steps", metavar="FRAC"
    )
    grad_clip: float = setting(
        5.0, "--grad-clip", "max global gradient norm; 0 = off", metavar="NORM"
    )
    label_smoothing: float = setting(0.1, "--label-smoothing", "label smoothing", metavar="EPS")


@dataclass(frozen=True)
class AugmentConfig:
    # The standard CIFAR recipe, batched on the device.
    crop_padding: int = setting(
        4,
        "--crop-padding",
        "random-crop padding in pixels of a 32 px image (scaled with the stored size); 0 = off",
        metavar="PX",
    )
    flip: bool = setting(True, "--no-flip", "no random horizontal flips")
    # BiT uses mixup 0.1 on CIFAR-10.
    mixup: float = setting(0.0, "--mixup", "mixup Beta(α,α); 0 = off", metavar="ALPHA")
    cutmix: float = setting(0.0, "--cutmix", "CutMix Beta(α,α); 0 = off", metavar="ALPHA")
    # Per image, on the device (data/policies.py). Off: TrivialAugment cost 6.6 points at the
    # first-hour scale here (BENCHMARKS.md, "EMA and TrivialAugment at the first-hour scale").
    policy: str = setting(
        "none",
        "--augment",
        "per-image policy after the crop and flip: trivial (TrivialAugment-Wide) or "
        "randaugment (2 ops at magnitude 9)",
        choices=AUGMENT_POLICIES,
    )
    resized_crop: float = setting(
        0.0,
        "--resized-crop",
        "random-resized-crop instead of the padded crop: a crop of MIN..1 of each image's "
        "area (aspect 3/4..4/3) resized back; 0 = off",
        metavar="MIN",
    )


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = setting(
        "full",
        "--strategy",
        "full: all layers, backbone at a lower lr; linear: head only, frozen BatchNorm; "
        "gradual: head first, then all",
        choices=STRATEGIES,
    )
    epochs: int | None = setting(None, "--epochs", "default: 10 on a GPU, 2 on a CPU")
    # A GPU needs big batches to stay busy: 512 ran at 7,429 img/s on an H100 at 160 px,
    # 128 at ~3,800 (issue 6's measurements).
    batch_size: int | None = setting(
        None,
        "--batch-size",
        "images per batch per process, what the card must hold (default: 512 on a GPU, 128 on "
        "a CPU)",
    )
    # Gradient accumulation (timm's --grad-accum-steps, the HF Trainer's
    # gradient_accumulation_steps): for cards that cannot hold the batch. BatchNorm still
    # normalises each --batch-size batch on its own, as in those tools.
    accum_steps: int = setting(
        1,
        "--accum-steps",
        "one optimizer step per N batches of --batch-size (their gradients summed): an "
        "effective batch of batch × N × processes, which the lr scaling follows",
        low=1,
        metavar="N",
    )
    freeze_epochs: int = setting(
        1, "--freeze-epochs", "gradual: epochs with the backbone frozen", metavar="N"
    )
    # Planned by `budget`: the fewest epochs that spend the budget, each a fresh random sample
    # when shorter than a pass (Keras' steps_per_epoch).
    steps_per_epoch: int | None = setting(
        None,
        "--steps-per-epoch",
        "optimizer steps per epoch (default: one pass over the training images; fewer: each "
        "epoch a new random sample of them)",
        metavar="N",
    )
    # Measured (BENCHMARKS.md, "the head's solver"): the same test accuracy (38.19 %) in less
    # than half of AdamW's time, and nothing to tune.
    probe_solver: str = setting(
        "lbfgs",
        "--probe-solver",
        "linear: fit the head on cached features by full-batch L-BFGS or by AdamW epochs",
        choices=PROBE_SOLVERS,
    )
    # The linear-evaluation protocol fits on the images as they are (Kornblith et al. 2019);
    # mirror images measured +1.6 points here for 1.6× the time (BENCHMARKS.md), so opt-in.
    probe_mirrors: bool = setting(
        False,
        "--probe-mirrors",
        "linear: also fit on each training image's mirror image (its features computed too)",
    )
    budget: str | None = setting(
        None,
        "--budget",
        "finish training, validation and the test evaluation within this time (90s, 10m, 1h): "
        "times a few steps, then plans the epochs, and the image size unless --image-size is "
        "given",
        metavar="TIME",
    )
    # For imbalanced own images. Off by default: reweighting trades overall accuracy for
    # recall on the rare classes, a choice the user makes.
    class_weights: str = setting(
        "none",
        "--class-weights",
        "auto: the loss weighs each class by N / (classes × its training images), as "
        "scikit-learn's 'balanced'",
        choices=CLASS_WEIGHTS,
    )
    balanced_sampling: bool = setting(
        False,
        "--balanced-sampling",
        "draw each epoch's images with replacement, every class equally often",
    )
    # Off: measured here from scratch at the first-hour scale, 0.999 cost 0.81 points (95 % CI
    # 0.46-1.15; BENCHMARKS.md, "EMA and TrivialAugment at the first-hour scale"); timm's and
    # the ConvNeXt/DeiT recipes use 0.9998-0.99996 over hundreds of epochs.
    ema: float = setting(
        0.0,
        "--ema",
        "weight EMA with this decay (e.g. 0.999; timm's warm-up): validation, best.pt and the "
        "test report use the averaged weights; 0 = off",
        metavar="DECAY",
    )
    progressive: bool = setting(
        False,
        "--progressive",
        "progressive resizing: early epochs at lower resolutions, the last quarter at "
        "--image-size (one schedule across them)",
    )
    seed: int = setting(0, "--seed", "fixes split, init, order and augmentation")
    device: str = device_setting()
    precision: str = setting(
        "auto",
        "--precision",
        "auto: bf16 where fast (modern GPUs and CPUs), fp16+grad scaler on older GPUs, else fp32",
        choices=PRECISIONS,
    )
    channels_last: bool = setting(True, "--no-channels-last", "keep NCHW memory layout")
    compile: str = setting(
        "auto",
        "--compile",
        "torch.compile: auto compiles when the run is long enough to repay it",
        choices=COMPILE,
    )
    sync_bn: bool = setting(
        False, "--sync-bn", "torchrun: BatchNorm statistics over all processes' batches"
    )
    out: str | None = setting(
        None, "--out", "run folder (default runs/<date-time>)", metavar="RUN_DIR"
    )
    checkpoint_every: int = setting(
        0,
        "--checkpoint-every",
        "also save last.pt every N steps; 0 = each epoch end",
        metavar="STEPS",
    )
    eval_batch_size: int | None = setting(
        None,
        "--eval-batch-size",
        "images per evaluation batch (default: 1024 on a GPU, 500 on a CPU)",
        metavar="N",
    )
    test_images: int | None = test_images_setting()
    patience: int | None = setting(
        None,
        "--patience",
        "early stopping: end the run once validation accuracy has not improved for N epochs "
        "(best.pt keeps the best epoch)",
        low=1,
        metavar="N",
    )
    progress: bool = setting(True, "--no-progress", "no progress bars")
    threads: int | None = setting(
        None, "--threads", "CPU threads (default: all cores)", metavar="N"
    )
    tensorboard: bool = setting(
        True, "--no-tensorboard", "no TensorBoard events in RUN_DIR/tensorboard"
    )
    # The HF Trainer's report_to: several at once, with commas.
    tracker: str = setting(
        "tensorboard",
        "--tracker",
        "where the run logs: tensorboard, mlflow (RUN_DIR/mlruns, or $MLFLOW_TRACKING_URI), "
        "wandb (offline in RUN_DIR/wandb unless WANDB_MODE=online), none; several with commas",
        metavar="NAMES",
    )


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
}


def _coerce(section: str, name: str, value: Any, annotation: str) -> Any:
    """Check a value from a file or dict against the field's declared type."""
    where = f"{section}.{name}"
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"config: {where} may not be empty")
    if where == "train.compile" and isinstance(value, bool):  # configs before auto|on|off
        return "on" if value else "off"
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise UserError(f"config: {where} must be true or false, got {value!r}")
        return value
    if "int" in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config: {where} must be a whole number, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if "str" in annotation:
        if not isinstance(value, str):
            raise UserError(f"config: {where} must be a string, got {value!r}")
        return value
    return value


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Overlay a nested dict (``{"optim": {"lr": 0.1}}``) on ``base``; unknown keys are errors."""
    base = base or Config()
    if not isinstance(data, dict):
        raise UserError("config: the top level must be a table of sections")
    sections = {}
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            raise UserError(
                f"config: unknown section [{section}]; expected one of {', '.join(_SECTION_TYPES)}"
            )
        if not isinstance(values, dict):
            raise UserError(f"config: [{section}] must be a table")
        current = getattr(base, section)
        fields = {f.name: f for f in dataclasses.fields(current)}
        changes = {}
        for name, value in values.items():
            if name not in fields:
                raise UserError(
                    f"config: unknown key {section}.{name}; known keys: {', '.join(fields)}"
                )
            f = fields[name]
            changes[name] = _coerce(section, name, value, str(f.type))
        sections[section] = dataclasses.replace(current, **changes)
    cfg = dataclasses.replace(base, **sections)
    validate(cfg)
    return cfg


def load_file(path: str | Path, base: Config | None = None) -> Config:
    """Read a TOML or JSON config file (a saved ``config.json`` from a run works too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {path} is not valid {path.suffix[1:] or 'TOML'}: {e}") from e
    return from_dict(data, base)


def override(cfg: Config, dotted: dict[str, Any]) -> Config:
    """Apply ``{"optim.lr": 0.1, ...}`` (CLI flags) on top of ``cfg``."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return from_dict(nested, cfg)


def train_flags() -> list[tuple[str, str, dict[str, Any]]]:
    """(flag, dotted key, argparse keywords) of every training setting that has a flag: the
    one declaration of flags, help texts and defaults."""
    return [flag for section, kind in _SECTION_TYPES.items() for flag in flags(kind, f"{section}.")]


def field_keys() -> dict[str, str]:
    """Each setting's bare name → its dotted key (``"lr"`` → ``"optim.lr"``); names are
    unique across sections, so the Python API can take ``train(lr=0.01, epochs=3)``."""
    return {
        f.name: f"{section}.{f.name}"
        for section, kind in _SECTION_TYPES.items()
        for f in dataclasses.fields(kind)
    }


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as dotted keys: ``{"optim": {"lr": 0.1}}`` → ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_settings(cfg: Config, settings: dict[str, Any]) -> Config:
    """``cfg`` with settings given by bare name or dotted key; unknown names are errors."""
    keys = field_keys()
    dotted = {}
    for name, value in settings.items():
        key = name if "." in name else keys.get(name)
        if key is None:
            import difflib

            close = difflib.get_close_matches(name, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown setting {name!r}{hint} (settings: {', '.join(keys)})")
        dotted[key] = value
    return override(cfg, dotted)
