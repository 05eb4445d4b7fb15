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
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .declare import flags, setting
from .errors import UserError
from .meta import IMAGE_SIZE_RANGE

WEIGHTS = ("imagenet", "imagenet-v1", "none")
STRATEGIES = ("full", "linear", "gradual")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE = ("auto", "on", "off")
AUGMENT_POLICIES = ("none", "trivial", "randaugment")  # --augment (data/policies.py)
PROBE_SOLVERS = ("lbfgs", "adamw")
CLASS_WEIGHTS = ("none", "auto")
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")


def device_setting(default: str = "auto") -> Any:
    """``--device``, for every command that runs a model (the choices: :data:`DEVICES`)."""
    return setting(default, "--device", "auto: cuda if available", choices=DEVICES)


def data_dir_setting() -> Any:
    """``--data-dir``, for every command that reads CIFAR-10."""
    return setting(
        None,
        "--data-dir",
        "folder holding cifar-10-batches-py/ (default $CIFAR10_DATA_DIR, else the user cache)",
        metavar="DIR",
    )


def test_images_setting() -> Any:
    """``--test-images``, for the training run's test report and ``evaluate``."""
    return setting(
        None,
        "--test-images",
        "test report on N stratified test images (default: all). For quick checks only: "
        "figures on a subset are not comparable with published ones",
        low=1,
        metavar="N",
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
    # Per image, on the device (data/policies.py); measured here before any default changes
    # (BENCHMARKS.md, "TrivialAugment and EMA at the first-hour scale").
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
    # Off until measured here to help (BENCHMARKS.md, "Weight EMA"); timm and the
    # ConvNeXt/DeiT recipes use 0.9998-0.99996 over hundreds of epochs.
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


_UNITS = {"s": 1, "m": 60, "h": 3600}  # --budget's units, in seconds


def parse_duration(text: str) -> float:
    """``"90s"``, ``"10m"``, ``"1h"``, ``"1h30m"``, or plain seconds (``"600"``) → seconds."""
    value = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise UserError(f"--budget {text!r}: write a duration such as 90s, 10m, 1h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"--budget {text!r} must be longer than zero")
    return seconds


def validate(cfg: Config) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    t, o, a, d, m = cfg.train, cfg.optim, cfg.augment, cfg.data, cfg.model
    check(t.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}, got {t.strategy!r}")
    check(o.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}")
    check(o.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}")
    check(t.device in DEVICES, f"--device must be one of {DEVICES}, got {t.device!r}")
    check(t.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}")
    check(t.epochs is None or t.epochs >= 1, "--epochs must be at least 1")
    check(t.batch_size is None or t.batch_size >= 1, "--batch-size must be at least 1")
    check(t.accum_steps >= 1, "--accum-steps must be at least 1")
    check(0 <= t.ema < 1, "--ema is a decay in [0, 1): e.g. 0.999; 0 = off")
    names = [n.strip() for n in t.tracker.split(",")]
    check(
        set(names) <= set(TRACKERS) and ("none" not in names or len(names) == 1),
        f"--tracker {t.tracker!r}: one or more of tensorboard, mlflow, wandb (with commas), "
        "or none",
    )
    check(t.class_weights in CLASS_WEIGHTS, f"--class-weights must be one of {CLASS_WEIGHTS}")
    check(
        not (t.class_weights != "none" and t.balanced_sampling),
        "--class-weights auto and --balanced-sampling both correct for imbalance; use one",
    )
    check(
        t.strategy != "linear" or (t.class_weights == "none" and not t.balanced_sampling),
        "--class-weights/--balanced-sampling act on training steps; the linear probe fits its "
        "head on cached features instead: use --strategy full or gradual",
    )
    check(
        not (t.ema and t.strategy == "linear"),
        "--ema averages the weights of training steps; --strategy linear fits its head on "
        "cached features instead: drop --ema",
    )
    check(
        t.eval_batch_size is None or t.eval_batch_size >= 1, "--eval-batch-size must be at least 1"
    )
    check(t.probe_solver in PROBE_SOLVERS, f"--probe-solver must be one of {PROBE_SOLVERS}")
    check(t.compile in COMPILE, f"--compile must be one of {COMPILE}, got {t.compile!r}")
    check(t.freeze_epochs >= 0, "--freeze-epochs must be 0 or more")
    check(t.seed >= 0, "--seed must be 0 or more")
    check(t.checkpoint_every >= 0, "--checkpoint-every must be 0 or more")
    check(t.test_images is None or t.test_images >= 1, "--test-images must be at least 1")
    check(t.patience is None or t.patience >= 1, "--patience must be at least 1")
    check(
        t.patience is None or d.val_size != 0,
        "--patience watches validation accuracy: it needs a validation split (--val-size > 0)",
    )
    check(
        t.steps_per_epoch is None or t.steps_per_epoch >= 1, "--steps-per-epoch must be at least 1"
    )
    if t.budget is not None:
        parse_duration(t.budget)
        check(
            t.epochs is None and t.steps_per_epoch is None,
            "--budget plans the epochs and steps itself; drop --epochs/--steps-per-epoch",
        )
    low, high = IMAGE_SIZE_RANGE
    check(
        m.image_size is None or low <= m.image_size <= high,
        f"--image-size must be in {low}..{high}",
    )
    check(bool(re.fullmatch(r"[a-z][a-z0-9_]*", m.arch)), f"--arch {m.arch!r}: not a model name")
    patch = patch_size(m.arch)
    if patch:
        check(
            m.image_size is None or m.image_size % patch == 0,
            f"--arch {m.arch} cuts images into {patch} px patches: --image-size must be a "
            f"multiple of {patch}",
        )
        check(
            not t.progressive and (t.budget is None or m.image_size is not None),
            f"--arch {m.arch} takes one input size: no --progressive, and give --image-size "
            "with --budget",
        )
    check(o.lr is None or o.lr > 0, "--lr must be positive")
    check(o.weight_decay is None or o.weight_decay >= 0, "--weight-decay must be 0 or more")
    check(0 <= o.warmup < 1, "--warmup is a fraction of all steps, in [0, 1)")
    check(o.grad_clip >= 0, "--grad-clip must be 0 (off) or positive")
    check(0 <= o.label_smoothing < 1, "--label-smoothing must be in [0, 1)")
    check(o.backbone_lr_scale > 0, "--backbone-lr-scale must be positive")
    check(0 <= a.crop_padding <= 16, "--crop-padding must be in 0..16")
    check(a.policy in AUGMENT_POLICIES, f"--augment must be one of {AUGMENT_POLICIES}")
    check(0 <= a.resized_crop < 1, "--resized-crop is the smallest area kept, in (0, 1); 0 = off")
    check(a.mixup >= 0 and a.cutmix >= 0, "--mixup/--cutmix alpha must be 0 (off) or positive")
    check(d.val_size is None or d.val_size >= 0, "--val-size must be 0 or more")
    check(d.test_size is None or d.test_size >= 1, "--test-size must be at least 1")
    check(
        d.store_size is None or low <= d.store_size <= high,
        f"--store-size must be in {low}..{high}",
    )
    check(
        d.source == "cifar10" or d.source.startswith(("folder:", "csv:")),
        f"--data {d.source!r}: use cifar10, folder:PATH (a folder of images) or csv:FILE "
        "(rows of path,label)",
    )
    check(
        d.source != "cifar10" or (d.store_size, d.test_size, d.strict) == (None, None, False),
        "--store-size, --test-size and --strict are for your own images (folder:PATH, csv:FILE)",
    )
    check(d.subset is None or d.subset >= 1, "--subset must be at least 1")
    check(t.threads is None or t.threads >= 1, "--threads must be at least 1")
    check(
        m.weights in WEIGHTS or Path(m.weights).expanduser().is_file(),
        f"--weights {m.weights!r}: not one of {', '.join(WEIGHTS)}, and no such file "
        "(a torchvision .pth of --arch)",
    )


BASE_BATCH = 128  # the batch size the default learning rates were chosen for


def scaled_lr(optimizer: str, global_batch: int) -> float:
    """Default peak lr for a global batch: SGD 0.1 and AdamW 1e-3 at batch 128, scaled
    linearly for SGD (Goyal et al. 2017: with warm-up, lr ∝ batch up to ~8k) and by the
    square root for AdamW (adaptive methods: Hoffer et al. 2017; Malladi et al. 2022)."""
    ratio = global_batch / BASE_BATCH
    return 0.1 * ratio if optimizer == "sgd" else 1e-3 * ratio**0.5


def step_batch(t: TrainConfig) -> int:
    """Images per optimizer step per process (resolved ``t``): ``--batch-size`` × ``--accum-steps``."""
    assert t.batch_size is not None, "resolve() sets the batch size"
    return t.batch_size * t.accum_steps


def patch_size(arch: str) -> int | None:
    """A Vision Transformer's patch size (``vit_b_16`` → 16): its input size must be a
    multiple of it, and one size only (its position embeddings)."""
    match = re.fullmatch(r"vit_[a-z]_(\d+)", arch)
    return int(match.group(1)) if match else None


def uses_tensorboard(t: TrainConfig) -> bool:
    """``--tracker`` names it and ``--no-tensorboard`` does not turn it off."""
    return t.tensorboard and "tensorboard" in [n.strip() for n in t.tracker.split(",")]


def default_image_size(device_type: str) -> int:
    return 160 if device_type == "cuda" else 64


def resolve(cfg: Config, device_type: str, world_size: int = 1, gpu_batch: int = 512) -> Config:
    """Fill every "auto" (None) field for ``device_type`` ("cuda" or "cpu") and the number
    of processes (the learning rate follows the global batch). ``gpu_batch``: the default
    batch on a GPU (smaller where the card's memory needs it: ``runtime.gpu_default_batch``)."""
    gpu = device_type == "cuda"
    sgd = cfg.optim.optimizer == "sgd"
    size = cfg.model.image_size or default_image_size(device_type)
    size -= size % (patch_size(cfg.model.arch) or 1)  # 64 and 160 are multiples of 16 and 32
    model = dataclasses.replace(cfg.model, image_size=size)
    data = cfg.data
    if data.source != "cifar10" and data.store_size is None:
        data = dataclasses.replace(data, store_size=model.image_size)
    batch = cfg.train.batch_size or (gpu_batch if gpu else 128)
    optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.optim.lr
        if cfg.optim.lr is not None
        else scaled_lr(cfg.optim.optimizer, batch * cfg.train.accum_steps * world_size),
        weight_decay=(
            cfg.optim.weight_decay
            if cfg.optim.weight_decay is not None
            else (5e-4 if sgd else 0.05)
        ),
    )
    train = dataclasses.replace(
        cfg.train,
        epochs=cfg.train.epochs or (10 if gpu else 2),
        batch_size=batch,
        eval_batch_size=cfg.train.eval_batch_size or (1024 if gpu else 500),
    )
    if train.strategy == "gradual" and train.freeze_epochs >= train.epochs:
        # Checked here, not in validate(): the epoch count is only known once resolved.
        raise UserError(
            f"--freeze-epochs {train.freeze_epochs} leaves no epoch to unfreeze in "
            f"{train.epochs}; lower it below --epochs, or use --strategy linear"
        )
    return dataclasses.replace(cfg, data=data, model=model, optim=optim, train=train)


def flags_markdown() -> str:
    """The README's `train` flags table, generated from the declarations above (a test keeps
    the README equal to it: ``python -c "from cifar10_resnet50.config import flags_markdown;
    print(flags_markdown())"`` regenerates it)."""
    lines = ["| flag | key | meaning |", "|---|---|---|"]
    for flag, key, kwargs in train_flags():
        text = kwargs["help"].replace("|", "\\|")
        if "choices" in kwargs:
            flag += " " + "\\|".join(kwargs["choices"])
        lines.append(f"| `{flag}` | `{key}` | {text} |")
    return "\n".join(lines)
