"""What the settings mean together: the checks across them (:func:`validate`), the choices
they allow, and the values derived from them (:func:`resolve`'s "auto" values, the lr rule,
the effective batch). ``config`` declares the settings and imports this module, never the
other way round: the sections arrive here as values (``config.Config`` and its dataclasses).

No torch here, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


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


def validate(cfg: Any) -> None:
    """Every setting in range, and no two that contradict each other; a one-line UserError
    naming the flag otherwise. ``cfg``: a ``config.Config``."""
    _check_train(cfg.train, cfg.data)
    _check_model(cfg.model, cfg.train)
    _check_optim(cfg.optim)
    _check_augment(cfg.augment)
    _check_data(cfg.data)


def _check_train(t: Any, d: Any) -> None:
    check = _check
    check(t.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}, got {t.strategy!r}")
    check(t.device in DEVICES, f"--device must be one of {DEVICES}, got {t.device!r}")
    check(t.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}")
    check(t.epochs is None or t.epochs >= 1, "--epochs must be at least 1")
    check(t.batch_size is None or t.batch_size >= 1, "--batch-size must be at least 1")
    check(t.accum_steps >= 1, "--accum-steps must be at least 1")
    check(
        t.eval_batch_size is None or t.eval_batch_size >= 1, "--eval-batch-size must be at least 1"
    )
    check(t.probe_solver in PROBE_SOLVERS, f"--probe-solver must be one of {PROBE_SOLVERS}")
    check(t.compile in COMPILE, f"--compile must be one of {COMPILE}, got {t.compile!r}")
    check(t.freeze_epochs >= 0, "--freeze-epochs must be 0 or more")
    check(t.seed >= 0, "--seed must be 0 or more")
    check(t.checkpoint_every >= 0, "--checkpoint-every must be 0 or more")
    check(t.test_images is None or t.test_images >= 1, "--test-images must be at least 1")
    check(t.threads is None or t.threads >= 1, "--threads must be at least 1")
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
    _check_training_extras(t)


def _check_training_extras(t: Any) -> None:
    """EMA, imbalance and trackers: what acts on training steps, which the probe has none of."""
    check = _check
    check(0 <= t.ema < 1, "--ema is a decay in [0, 1): e.g. 0.999; 0 = off")
    check(
        not (t.ema and t.strategy == "linear"),
        "--ema averages the weights of training steps; --strategy linear fits its head on "
        "cached features instead: drop --ema",
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
    names = [n.strip() for n in t.tracker.split(",")]
    check(
        set(names) <= set(TRACKERS) and ("none" not in names or len(names) == 1),
        f"--tracker {t.tracker!r}: one or more of tensorboard, mlflow, wandb (with commas), "
        "or none",
    )


def _check_model(m: Any, t: Any) -> None:
    check = _check
    low, high = IMAGE_SIZE_RANGE
    check(
        m.image_size is None or low <= m.image_size <= high,
        f"--image-size must be in {low}..{high}",
    )
    check(
        bool(re.fullmatch(r"(timm/)?[a-z][a-z0-9_.]*", m.arch)),
        f"--arch {m.arch!r}: not a model name (torchvision's, or timm/NAME)",
    )
    check(
        m.weights in WEIGHTS or Path(m.weights).expanduser().is_file(),
        f"--weights {m.weights!r}: not one of {', '.join(WEIGHTS)}, and no such file "
        "(a torchvision .pth of --arch)",
    )
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


def _check_optim(o: Any) -> None:
    check = _check
    check(o.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}")
    check(o.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}")
    check(o.lr is None or o.lr > 0, "--lr must be positive")
    check(o.weight_decay is None or o.weight_decay >= 0, "--weight-decay must be 0 or more")
    check(0 <= o.warmup < 1, "--warmup is a fraction of all steps, in [0, 1)")
    check(o.grad_clip >= 0, "--grad-clip must be 0 (off) or positive")
    check(0 <= o.label_smoothing < 1, "--label-smoothing must be in [0, 1)")
    check(o.backbone_lr_scale > 0, "--backbone-lr-scale must be positive")


def _check_augment(a: Any) -> None:
    check = _check
    check(0 <= a.crop_padding <= 16, "--crop-padding must be in 0..16")
    check(a.policy in AUGMENT_POLICIES, f"--augment must be one of {AUGMENT_POLICIES}")
    check(0 <= a.resized_crop < 1, "--resized-crop is the smallest area kept, in (0, 1); 0 = off")
    check(a.mixup >= 0 and a.cutmix >= 0, "--mixup/--cutmix alpha must be 0 (off) or positive")


def _check_data(d: Any) -> None:
    check = _check
    low, high = IMAGE_SIZE_RANGE
    check(d.val_size is None or d.val_size >= 0, "--val-size must be 0 or more")
    check(d.test_size is None or d.test_size >= 1, "--test-size must be at least 1")
    check(d.subset is None or d.subset >= 1, "--subset must be at least 1")
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


BASE_BATCH = 128  # the batch size the default learning rates were chosen for


def scaled_lr(optimizer: str, global_batch: int) -> float:
    """Default peak lr for a global batch: SGD 0.1 and AdamW 1e-3 at batch 128, scaled
    linearly for SGD (Goyal et al. 2017: with warm-up, lr ∝ batch up to ~8k) and by the
    square root for AdamW (adaptive methods: Hoffer et al. 2017; Malladi et al. 2022)."""
    ratio = global_batch / BASE_BATCH
    return 0.1 * ratio if optimizer == "sgd" else 1e-3 * ratio**0.5


def step_batch(t: Any) -> int:
    """Images per optimizer step per process (resolved ``t``): ``--batch-size`` × ``--accum-steps``."""
    assert t.batch_size is not None, "resolve() sets the batch size"
    return t.batch_size * t.accum_steps


def patch_size(arch: str) -> int | None:
    """A Vision Transformer's patch size (``vit_b_16`` → 16): its input size must be a
    multiple of it, and one size only (its position embeddings)."""
    match = re.fullmatch(r"vit_[a-z]_(\d+)", arch) or (
        re.search(r"patch(\d+)", arch) if arch.startswith("timm/") else None  # timm's names
    )
    return int(match.group(1)) if match else None


def uses_tensorboard(t: Any) -> bool:
    """``--tracker`` names it and ``--no-tensorboard`` does not turn it off."""
    return t.tensorboard and "tensorboard" in [n.strip() for n in t.tracker.split(",")]


def default_image_size(device_type: str) -> int:
    return 160 if device_type == "cuda" else 64


def resolve(cfg: Any, device_type: str, world_size: int = 1, gpu_batch: int = 512) -> Any:
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
