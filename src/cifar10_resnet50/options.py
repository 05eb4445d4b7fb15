"""Settings several commands share (``--device``, ``--data-dir``, ``--test-images``), and the
options of commands whose code needs torch at import (``lr-find``'s sweep, the ``data``
command's), declared here so that ``--help`` and the flags' checks need none. Training's
settings are ``config``'s; the model commands' are ``serving.settings``'; evaluate's and
compare's ``evaluation.settings``'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .declare import setting
from .rules import DEVICES


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
class LrFindOptions:
    """``lr-find``'s sweep (the run it sweeps is described by the training settings)."""

    steps: int = setting(100, "--steps", "sweep length in steps", low=2)
    start_lr: float = setting(1e-7, "--start-lr", "the sweep's first lr", above=0)
    end_lr: float = setting(10.0, "--end-lr", "the sweep's last lr", above=0)


@dataclass(frozen=True)
class DataCommandOptions:
    """``data``'s own options (which data, where, at what size: :class:`DataConfig`'s)."""

    progress: bool = setting(True, "--no-progress", "no progress bar")


@dataclass(frozen=True)
class ShowOptions:
    """``data show``'s grid (its augmentation: :class:`AugmentConfig`'s, as train's)."""

    out: str = setting("batch.png", "--out", "PNG to write", metavar="FILE")
    n: int = setting(32, "--n", "images", low=1, high=256)
    seed: int = setting(0, "--seed", "the augmentation's randomness", low=0)
