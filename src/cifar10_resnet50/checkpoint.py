"""Checkpoints: versioned dicts of plain data, written atomically, read with weights_only=True.

Layout (version 1)::

    format       "cifar10-resnet50/checkpoint"
    version      1
    model_meta   classes, image size, normalisation, weights used (see model.model_meta)
    model        the Classifier's state dict
    config       the resolved run config, as a dict
    versions     torch / torchvision / cifar10_resnet50 versions that wrote it
    train_state  (last.pt only) optimizer, scheduler, grad scaler, weight EMA (--ema), RNG state,
                 position (epoch, batch, step), best validation accuracy, partial-epoch sums
    metrics      (best.pt only) the metrics.jsonl row of the epoch it was saved at

Loading with ``weights_only=True`` means a checkpoint can never run code on load.
"""

from __future__ import annotations

import logging
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import UserError, first_line
from .fileio import require_file, save_torch
from .meta import validate_meta
from .model import Classifier, from_meta

log = logging.getLogger(__name__)

FORMAT = "cifar10-resnet50/checkpoint"
VERSION = 1


def versions() -> dict[str, str]:
    import torchvision

    return {
        "torch": str(torch.__version__),  # TorchVersion is not a plain str (weights_only)
        "torchvision": str(torchvision.__version__),
        "cifar10_resnet50": __version__,
    }


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    return [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def _refuse_non_finite(path: str | Path, weights: dict[str, torch.Tensor]) -> None:
    bad = _non_finite(weights)
    if bad:
        raise UserError(
            f"refusing to write {path}: non-finite values in {bad[:3]}; training diverged — "
            "lower --lr or use --precision fp32"
        )


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically; refuse model weights with NaN/inf."""
    _refuse_non_finite(path, payload["model"])
    blob = {"format": FORMAT, "version": VERSION, "versions": versions(), **payload}
    save_torch(blob, path)


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a one-line UserError."""
    path = require_file(path, "checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; say so plainly, not pickle-speak
        raise UserError(f"{path} is not a checkpoint (a .pt file written by train)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, disallowed pickle globals
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e)})"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{path} is not a cifar10-resnet50 checkpoint")
    if blob.get("version") != VERSION:
        raise UserError(
            f"{path} is checkpoint version {blob.get('version')}; this release reads version "
            f"{VERSION}. Use the cifar10-resnet50 release that wrote it."
        )
    return blob


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """The trained model in eval mode, plus its ``model_meta``, validated: metadata keys,
    types and ranges, weights that fit the architecture it names (so the class count matches
    the head), and finite values. Any problem is a one-line UserError."""
    blob = load(path)
    meta = validate_meta(blob.get("model_meta"), str(path))
    state = blob.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: no model weights in the checkpoint; it is damaged")
    model = from_meta(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not fit the model its metadata describes "
            f"({meta['num_classes']} classes, resnet50): {first_line(e)}"
        ) from None
    bad = _non_finite(state)
    if bad:
        raise UserError(
            f"{path}: weights hold NaN or inf (e.g. {bad[0]}); the model cannot predict. "
            "Use another checkpoint (training never writes such weights)."
        )
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------- a run's layout


def _zero_sums() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0.0, "seen": 0.0}


@dataclass
class RunState:
    """Where a run stands: the position, the best validation accuracy so far and the running
    sums of the current epoch (device tensors while training, floats when saved)."""

    epoch: int = 0
    batch: int = 0  # batches of this epoch already trained
    step: int = 0  # optimizer steps in all
    best_val_acc: float | None = None
    sums: dict[str, Any] = field(default_factory=_zero_sums)
    best_epoch: int | None = None  # epochs done when best_val_acc was reached (--patience)

    def out_of_patience(self, patience: int | None) -> bool:
        """``--patience``: ``patience`` epochs have passed since the best one."""
        return (
            bool(patience)
            and self.best_epoch is not None
            and (self.epoch - self.best_epoch >= patience)
        )

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.sums = self.epoch + 1, 0, _zero_sums()


def host_copy(obj: Any) -> Any:
    """``obj`` (a state dict, nested) with every tensor copied to host memory: a snapshot that
    training can no longer change while a thread writes it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    """What an epoch's end saves, copied to host memory (``Saver.snapshot``)."""

    last: dict[str, Any]  # last.pt's payload
    best: dict[str, torch.Tensor] | None  # the weights for best.pt, when the epoch improved


class Saver:
    """Owns a run folder's checkpoints, and is the one place their dicts are built:
    ``last.pt`` (everything ``--resume`` needs) and ``best.pt`` (the model alone, a third
    of the size with AdamW, plus the metrics of its epoch). Only the main process writes.

    Saving is two steps so that it does not stall training: :meth:`snapshot` copies the
    state to host memory on the training thread (~190 MB for ResNet-50 with SGD: a few ms
    from a GPU), :meth:`write` serialises and fsyncs it on a writer thread (~1 s here) while
    the next epoch trains. One write is in flight at a time; :meth:`wait` returns when it is
    on disk and raises its error, if any. Each file is still replaced atomically: a kill
    during a write leaves the previous one whole."""

    def __init__(self, out: Path, meta: dict, config: dict, *, is_main: bool, world_size: int):
        self.last, self.best = out / "last.pt", out / "best.pt"
        self.meta, self.config = meta, config
        self.is_main, self.world_size = is_main, world_size
        # A CPU copy of the best weights, so the final evaluation needs no file read.
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_row: dict[str, Any] | None = None
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def snapshot(self, model, opt, state: RunState, *, best: bool = False) -> Snapshot | None:
        """Host copies of what ``last.pt`` (and ``best.pt`` when ``best``) will hold; ``opt``:
        the optimizer, schedule and scaler (``state_dict()`` gives them by those names).
        Weights with NaN/inf are refused here, on the training thread."""
        if not self.is_main:
            return None
        weights = host_copy(model.state_dict())
        _refuse_non_finite(self.last, weights)
        opt_state = host_copy(opt.state_dict())  # optimizer, scheduler, scaler (and ema)
        # With --ema the averaged weights are what the run validates, so what best.pt keeps.
        evaluated = opt_state["ema"]["weights"] if "ema" in opt_state else weights
        # The CPU generator only. Training draws every random number on the device from
        # generators keyed by (seed, epoch, batch) (data.augment), so the CUDA states are never
        # needed, and restoring one per GPU failed when fewer GPUs were visible at resume.
        train_state = {
            **opt_state,
            "rng": {"torch": torch.get_rng_state()},
            "epoch": state.epoch,
            "batch": state.batch,
            "step": state.step,
            "best_val_acc": state.best_val_acc,
            "best_epoch": state.best_epoch,
            "epoch_sums": {k: float(v) for k, v in state.sums.items()},
            "world_size": self.world_size,
        }
        last = {
            "model_meta": self.meta, "model": weights, "config": self.config,
            "train_state": train_state,
        }  # fmt: skip
        return Snapshot(last, evaluated if best else None)

    def write(self, snap: Snapshot | None, best_row: dict[str, Any] | None = None) -> None:
        """Write ``snap`` on the writer thread (after the write before it): ``last.pt``, then
        ``best.pt`` with ``best_row`` (its epoch's metrics) when the snapshot holds best
        weights."""
        if snap is None:
            return
        self.wait()
        files = [(self.last, snap.last)]
        if snap.best is not None:
            self.best_state, self.best_row = snap.best, dict(best_row or {})
            files.append((self.best, self._best_payload()))
        self._writer = threading.Thread(
            target=self._write_files, args=(files,), name="checkpoint-writer"
        )
        self._writer.start()

    def _write_files(self, files: list[tuple[Path, dict[str, Any]]]) -> None:
        try:
            for path, payload in files:
                save(path, payload)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Return once the last write is on disk; raise the error it met, if any."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def save_last(self, model, opt, state: RunState, best_row: dict | None = None) -> None:
        """Snapshot and write ``last.pt`` (and ``best.pt`` with ``best_row``), in the
        background."""
        self.write(self.snapshot(model, opt, state, best=best_row is not None), best_row)

    def _best_payload(self) -> dict[str, Any]:
        assert self.best_state is not None and self.best_row is not None
        blob = {"model_meta": self.meta, "model": self.best_state, "config": self.config}
        return {**blob, "metrics": self.best_row}

    def calibrate(self, temperature: float) -> None:
        """Store the fitted temperature in the model's metadata and rewrite ``best.pt`` with it
        (from the copy in memory: the file is never read back)."""
        self.meta = {**self.meta, "temperature": temperature}
        self.wait()
        if self.is_main and self.best_state is not None:
            save(self.best, self._best_payload())

    def restore(self, saved: dict, model, opt) -> RunState:
        """Put a loaded ``last.pt`` back into the training objects; return its position."""
        ts = saved["train_state"]
        world = ts.get("world_size", 1)
        if world != self.world_size:
            raise UserError(
                f"{self.last} was trained by {world} process(es) and is resumed by "
                f"{self.world_size}: each process's share of every batch would change. Resume "
                f"with torchrun --nproc-per-node × --nnodes = {world} processes, or start a "
                "new run."
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(
            {k: ts[k] for k in ("optimizer", "scheduler", "scaler", "ema") if k in ts}
        )
        torch.set_rng_state(ts["rng"]["torch"])  # a "cuda" entry (older files) is not used
        return RunState(
            ts["epoch"],
            ts["batch"],
            ts["step"],
            ts["best_val_acc"],
            dict(ts["epoch_sums"]),
            ts.get("best_epoch"),  # absent in files from before --patience
        )
