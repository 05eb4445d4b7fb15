"""The options of commands whose code needs torch at import (``lr-find``'s sweep, the ``data``
command's), declared here so that ``--help`` and the flags' checks need none. Training's
settings are ``config``'s; the model commands' are ``serving.settings``'; evaluate's and
compare's ``evaluation.settings``'."""

from __future__ import annotations

from dataclasses import dataclass

from .declare import setting


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
