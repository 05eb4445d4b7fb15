"""TensorBoard logging of a training run (``RUN_DIR/tensorboard``; ``--no-tensorboard`` off).

Scalars at every host sync of the loop (each ``LOG_EVERY`` steps, so logging adds no GPU
stall): training loss, learning rate, images per second. Per epoch: train and validation
loss and accuracy; at the last epoch, the validation confusion matrix and a grid of
validation images with their predicted and true classes. Only the main process writes. ``tensorboard --logdir runs`` shows
every run side by side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .callbacks import Callback

log = logging.getLogger(__name__)

SAMPLES = 16  # validation images in the per-epoch predictions grid


class Board(Callback):
    """Writes TensorBoard events; every method is a no-op when disabled. A loop callback."""

    def __init__(self, folder: Path | None, *, start_step: int = 0):
        self.writer = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a trimmed install still trains
            log.warning(
                "tensorboard is not installed; no TensorBoard logs (pip install tensorboard)"
            )
            return
        # purge_step: a resumed run drops events logged after its last save (they are redone).
        self.writer = SummaryWriter(str(folder), purge_step=start_step or None)

    def step(self, step: int, loss: float, lr: float, img_per_s: float) -> None:
        if self.writer:
            self.writer.add_scalar("step/train_loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)
            self.writer.add_scalar("step/img_per_s", img_per_s, step)

    def epoch(self, row: dict[str, Any]) -> None:
        if not self.writer:
            return
        step = row["step"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], step)

    def predictions(
        self,
        step: int,
        images: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
    ) -> None:
        """The confusion matrix and a grid of the first validation images, as figures."""
        if not self.writer:
            return
        from ..evaluation import plots
        from ..evaluation.evaluate import metrics

        m = metrics(logits, labels, len(classes))
        self.writer.add_figure(
            "val/confusion", plots.confusion_figure(m["confusion"], classes, "validation"), step
        )
        n = min(SAMPLES, len(images))
        probs = torch.softmax(logits[:n].float(), dim=1)
        conf, pred = probs.max(1)
        titles = [
            f"{classes[p]} {100 * c:.0f}%\n(true {classes[t]})"
            for p, c, t in zip(pred.tolist(), conf.tolist(), labels[:n].tolist(), strict=True)
        ]
        ok = [p == t for p, t in zip(pred.tolist(), labels[:n].tolist(), strict=True)]
        self.writer.add_figure("val/predictions", plots.grid_figure(images[:n], titles, ok), step)

    def sync(self, trainer: Any, state: Any, loss: float, img_per_s: float) -> None:
        self.step(state.step, loss, trainer.opt.lr, img_per_s)

    def epoch_end(self, trainer: Any, state: Any, row: dict[str, Any], val_logits: Any) -> None:
        split = trainer.split
        # Figures at the last epoch only: drawing them took ~1 s an epoch on this CPU
        # (matplotlib), against a ~6 s epoch on an H100 — the scalars show the trend.
        last = state.epoch >= trainer.cfg.train.epochs
        if last and val_logits is not None and trainer.process.is_main and len(split.val_y):
            self.predictions(
                row["step"], split.val_x, val_logits, split.val_y, trainer.meta["classes"]
            )
        self.epoch(row)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
