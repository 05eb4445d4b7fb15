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

from .errors import UserError

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

WEIGHTS = ("imagenet", "imagenet-v1", "none")
STRATEGIES = ("full", "linear", "gradual")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DataConfig:
    # Folder holding ``cifar-10-batches-py/``; None → $CIFAR10_DATA_DIR, else the user cache.
    data_dir: str | None = None
    # Download the official archive when the folder has no data (md5-verified, never silent).
    download: bool = True
    # Stratified, seeded hold-out from the 50,000 training images, used for model selection.
    val_size: int = 5000
    # Train on the first N (shuffled, stratified-split) training images; None = all.
    subset: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    # "imagenet" (IMAGENET1K_V2), "imagenet-v1", "none", or a path to a torchvision state dict.
    weights: str = "imagenet"
    # Side length the 32 px images are resized to inside the model. None → per device:
    # 160 on CUDA (BiT-HyperRule resizes small images to 160 px; 160–224 is the known-good
    # range), 64 on CPU (an epoch in ~5 minutes on 2 cores instead of hours at 224 px).
    image_size: int | None = None


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    # Peak learning rate of the new head. None → 0.1 for SGD, 1e-3 for AdamW (batch 128).
    lr: float | None = None
    # Pretrained layers learn this much slower than the head (discriminative fine-tuning,
    # as fastai and Kornblith et al. 2019). Ignored (1.0) when training from scratch.
    backbone_lr_scale: float = 0.1
    momentum: float = 0.9
    # None → 5e-4 for SGD, 0.05 for AdamW. Never applied to BatchNorm weights or biases.
    weight_decay: float | None = None
    schedule: str = "cosine"
    # Linear warm-up, as a fraction of all steps (protects pretrained features from the
    # large gradients of the randomly initialised head in the first steps).
    warmup: float = 0.05
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 5.0
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class AugmentConfig:
    # Random crop from a reflect-padded image (pixels, at 32 px) and horizontal flip: the
    # standard CIFAR recipe, done batched on the device.
    crop_padding: int = 4
    flip: bool = True
    # Beta(alpha, alpha) mixing strength; 0 disables. BiT uses mixup 0.1 on CIFAR-10.
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = "full"
    # None → 10 on CUDA, 2 on CPU.
    epochs: int | None = None
    batch_size: int = 128
    # With --strategy gradual: epochs with the backbone frozen before everything trains.
    freeze_epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    out: str | None = None
    # Also save ``last`` every N optimizer steps (0 = only at the end of each epoch).
    checkpoint_every: int = 0
    eval_batch_size: int = 500
    progress: bool = True
    # CPU threads for PyTorch; None → all cores. Leaves cores free on a shared machine.
    threads: int | None = None
    # TensorBoard events in RUN_DIR/tensorboard (scalars at each host sync, per-epoch
    # confusion matrix and predictions): `tensorboard --logdir runs`.
    tensorboard: bool = True


# Limits for user images (predict and serve share them).
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Refuse images above this many pixels before decoding them (a 30000×30000 PNG header would
# otherwise ask for 2.7 GB). 50 MP covers any camera photo.
MAX_IMAGE_PIXELS = 50_000_000
# Per-image decode deadline. A 48 MP PNG decodes in ~1 s on this 2-core CPU, a 12 MP JPEG in
# ~0.1 s (draft mode); 5 s is far beyond any honest file.
MAX_DECODE_SECONDS = 5.0


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``serve``; its flags default to these."""

    max_body_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_files: int = 64  # images in one request
    max_batch: int = 32  # images in one model call
    # Extra wait for a fuller batch. 0 (greedy) measured best here: with 5 ms, throughput at
    # concurrency 1 halved, and under load batches fill while the model runs anyway.
    max_wait_ms: float = 0.0
    queue_images: int = 256  # images waiting; beyond this: 503 + Retry-After
    # Per request, from the first byte read to the answer: reading, decoding, queueing and
    # inference. Beyond this: 504, and the request's remaining work is dropped.
    timeout_s: float = 30.0
    top_k: int = 5
    decode_timeout_s: float = MAX_DECODE_SECONDS  # per image; beyond this: 422 too_slow
    # Images decoded at once across all requests (each thread may hold a 50 MP image, 150 MB);
    # None → the number of CPU cores.
    decode_workers: int | None = None
    # Sum of header pixels of one request's images; beyond this: 413 before any decoding
    # (32 near-limit images in one request took 2.3 GB and 59 s before this bound).
    max_request_pixels: int = 2 * MAX_IMAGE_PIXELS
    # Request line + headers; beyond this: 431 and the connection is closed (uvicorn's
    # httptools parser has no limit of its own: a 64 MiB header was accepted).
    max_header_bytes: int = 64 * 1024


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
    check(t.batch_size >= 1, "--batch-size must be at least 1")
    check(t.eval_batch_size >= 1, "eval_batch_size must be at least 1")
    check(t.freeze_epochs >= 0, "--freeze-epochs must be 0 or more")
    check(t.seed >= 0, "--seed must be 0 or more")
    check(t.checkpoint_every >= 0, "--checkpoint-every must be 0 or more")
    check(m.image_size is None or 16 <= m.image_size <= 512, "--image-size must be in 16..512")
    check(o.lr is None or o.lr > 0, "--lr must be positive")
    check(o.weight_decay is None or o.weight_decay >= 0, "--weight-decay must be 0 or more")
    check(0 <= o.warmup < 1, "--warmup is a fraction of all steps, in [0, 1)")
    check(o.grad_clip >= 0, "--grad-clip must be 0 (off) or positive")
    check(0 <= o.label_smoothing < 1, "--label-smoothing must be in [0, 1)")
    check(o.backbone_lr_scale > 0, "--backbone-lr-scale must be positive")
    check(0 <= a.crop_padding <= 16, "--crop-padding must be in 0..16")
    check(a.mixup >= 0 and a.cutmix >= 0, "--mixup/--cutmix alpha must be 0 (off) or positive")
    check(0 <= d.val_size < 50000, "--val-size must be in 0..49999")
    check(d.subset is None or d.subset >= 1, "--subset must be at least 1")
    check(t.threads is None or t.threads >= 1, "--threads must be at least 1")
    check(
        m.weights in WEIGHTS or Path(m.weights).expanduser().is_file(),
        f"--weights {m.weights!r}: not one of {', '.join(WEIGHTS)}, and no such file "
        "(a torchvision ResNet-50 .pth)",
    )


def resolve(cfg: Config, device_type: str) -> Config:
    """Fill every "auto" (None) field for ``device_type`` ("cuda" or "cpu")."""
    gpu = device_type == "cuda"
    sgd = cfg.optim.optimizer == "sgd"
    model = dataclasses.replace(cfg.model, image_size=cfg.model.image_size or (160 if gpu else 64))
    optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.optim.lr if cfg.optim.lr is not None else (0.1 if sgd else 1e-3),
        weight_decay=(
            cfg.optim.weight_decay
            if cfg.optim.weight_decay is not None
            else (5e-4 if sgd else 0.05)
        ),
    )
    train = dataclasses.replace(cfg.train, epochs=cfg.train.epochs or (10 if gpu else 2))
    if train.strategy == "gradual" and train.freeze_epochs >= train.epochs:
        # Checked here, not in validate(): the epoch count is only known once resolved.
        raise UserError(
            f"--freeze-epochs {train.freeze_epochs} leaves no epoch to unfreeze in "
            f"{train.epochs}; lower it below --epochs, or use --strategy linear"
        )
    return dataclasses.replace(cfg, model=model, optim=optim, train=train)
