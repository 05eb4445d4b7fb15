"""The training loop: epochs of steps, read top to bottom in :func:`fit`.

Per step: :func:`core.train_step` on the epoch's augmented batch, running sums kept on the
device. Every ``LOG_EVERY`` steps (and at an epoch's end, a save or a stop) one host sync:
progress bar, NaN check, the ranks' agreement on stopping, the compile policy, callbacks'
``sync``. Per epoch (:func:`end_epoch`): BatchNorm statistics averaged over ranks,
validation, the metrics row, ``last.pt`` (and ``best.pt`` when it improved), callbacks'
``epoch_end``; then ``--budget`` may drop epochs that would overrun.

Ctrl-C or SIGTERM sets a flag; the loop finishes the step, saves ``last.pt`` and returns.
Stopping inside a step (e.g. halfway through ``optimizer.step()``) would save a state that no
uninterrupted run ever had.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import RunState
from ..errors import UserError
from . import core, metrics, planning
from .callbacks import Callback, StepOutput
from .trainer import Trainer

log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between host syncs (progress bar, NaN check); each sync stalls a GPU


@dataclasses.dataclass
class Epoch:
    """One epoch's bookkeeping, from its start (or resume point) to its row."""

    started: float  # clock() at its start
    seen0: float  # images counted in state.sums when it started
    pending: list[torch.Tensor] = dataclasses.field(default_factory=list)  # losses since a sync
    pending_from: int = 0  # the step of pending[0]
    # [step, mean loss since the last sync, lr] at each sync: metrics.jsonl's "steps"
    step_log: list[list[float]] = dataclasses.field(default_factory=list)


def fit(
    t: Trainer, state: RunState, callbacks: list[Callback], stop_after: int | None = None
) -> bool:
    """Train from ``state`` to the last epoch; True if stopped early (``last.pt`` saved).
    ``stop_after`` stops exactly as Ctrl-C does after that many steps in all (tests)."""
    totals = Totals(t.clock())
    with StopFlag() as stop:
        while state.epoch < t.cfg.train.epochs:  # --budget's re-planning may lower it
            if state.out_of_patience(t.cfg.train.patience):  # the same on every rank
                _log_patience(state, t.cfg.train.patience)
                break
            epoch = Epoch(t.clock(), float(state.sums["seen"]), pending_from=state.step)
            if train_epoch(t, state, epoch, stop, callbacks, stop_after):
                log.warning(
                    "stopped at epoch %d, batch %d; '--resume --out %s' continues",
                    state.epoch + 1, state.batch, t.out,
                )  # fmt: skip
                t.saver.wait()
                return True
            totals.add(end_epoch(t, state, epoch, callbacks))
            planning.keep_to_budget(t, state, t.clock() - epoch.started)
    t.saver.wait()  # the last epoch's checkpoints are on disk (and their time counted)
    totals.log(t.clock())
    return False


def _log_patience(state: RunState, patience: int) -> None:
    log.info(
        "early stop after epoch %d: validation accuracy has not improved for %d epoch(s) "
        "(best %.2f%% at epoch %d; --patience %d)",
        state.epoch, state.epoch - state.best_epoch, 100 * state.best_val_acc, state.best_epoch,
        patience,
    )  # fmt: skip


@dataclasses.dataclass
class Totals:
    """This invocation's epochs: the training loop's img/s beside the whole run's (wall
    clock over every epoch, with validation, saving and logging: what a user's job gets)."""

    started: float  # clock() before the first epoch
    epochs: int = 0
    images: float = 0.0  # trained, summed over ranks
    train_s: float = 0.0  # in the training loop

    def add(self, row: dict[str, Any]) -> None:
        self.epochs += 1
        self.images += row["images"]
        self.train_s += row["time"]["train"]

    def log(self, now: float) -> None:
        if not self.epochs:
            return
        wall = now - self.started
        log.info(
            "%d epoch(s): %.0f img/s in the training loop, %.0f img/s over the whole run "
            "(%.1f s wall clock, validation, saving and logging included)",
            self.epochs, self.images / max(self.train_s, 1e-9), self.images / max(wall, 1e-9),
            wall,
        )  # fmt: skip


def train_epoch(
    t: Trainer,
    state: RunState,
    epoch: Epoch,
    stop: StopFlag,
    callbacks: list[Callback],
    stop_after: int | None,
) -> bool:
    """Train from ``state``'s position to the end of its epoch; True if asked to stop."""
    from tqdm import tqdm

    tc = t.cfg.train
    forward = t.prepare(core.frozen_at(tc.strategy, state.epoch, tc.freeze_epochs))
    t.compile.start_epoch()
    bar = tqdm(
        total=t.steps_per_epoch, initial=state.batch, desc=f"epoch {state.epoch + 1}/{tc.epochs}",
        unit="step", disable=not (tc.progress and t.process.is_main), leave=False,
    )  # fmt: skip
    with bar:
        for i, xb, yb, target in t.batches.epoch(state.epoch, start=state.batch):
            with core.at_size(t.model, t.size_at(state.epoch)):
                out = StepOutput(*core.train_step(forward, t.model, t.opt, t.recipe, xb, target))
                for c in callbacks:
                    c.step_end(t, state, out)
            state.step, state.batch = state.step + 1, i + 1
            # Running sums stay on the device: no host sync per step.
            epoch.pending.append(out.loss)
            state.sums["loss"] += out.loss * len(yb)
            state.sums["correct"] += (out.logits.argmax(1) == yb).sum()
            state.sums["seen"] += len(yb)
            bar.update(1)
            asked = stop_after is not None and state.step >= stop_after
            save_now = bool(tc.checkpoint_every) and state.step % tc.checkpoint_every == 0
            sync = state.step % LOG_EVERY == 0 or state.batch == t.steps_per_epoch
            sync = sync or asked or save_now or (stop.requested and not t.process.distributed)
            if not sync:  # alone, a stop is taken at once; ranks stop at a shared sync
                continue
            stopping = _sync(t, state, epoch, stop.requested or asked, bar, callbacks)
            if t.compile.changed:
                forward = t.prepare(t.frozen)
            if stopping or save_now:
                t.saver.save_last(t.model, t.opt, state)
            if stopping:
                return True
    return False


def _sync(
    t: Trainer, state: RunState, epoch: Epoch, stop: bool, bar: Any, callbacks: list[Callback]
) -> bool:
    """A host sync: the NaN check and the stop agreed by every rank, the window's mean loss
    for the bar, the log and callbacks, the compile policy. True: every rank stops now."""
    bad = _first_non_finite(epoch.pending, epoch.pending_from)
    any_bad, any_stop = t.process.any([bad is not None, stop], t.device)
    if any_bad:
        raise _non_finite_error(bad, t.steps_per_epoch)
    window = float(torch.stack(epoch.pending).float().mean())
    epoch.pending, epoch.pending_from = [], state.step
    now = t.clock()
    rate = (
        (state.sums["seen"] - epoch.seen0) * t.process.world_size / max(now - epoch.started, 1e-9)
    )
    bar.set_postfix(loss=f"{window:.3f}", img_s=f"{rate:.0f}", **planning.eta(t, state.step))
    epoch.step_log.append([state.step, round(window, 5), t.opt.lr])
    for c in callbacks:
        c.sync(t, state, window, rate)
    if t.compile.deciding:
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        t.compile.at_sync(
            t.clock(), state.step, t.size_at(state.epoch),
            lambda: t.work(state.epoch, state.batch),
            lambda decision: t.process.any([decision and t.process.is_main], t.device)[0],
        )  # fmt: skip
    return any_stop


def end_epoch(
    t: Trainer, state: RunState, epoch: Epoch, callbacks: list[Callback]
) -> dict[str, Any]:
    """Validate, snapshot ``last`` (and ``best`` if it improved), callbacks, then append the
    metrics row with the epoch's time split and hand the snapshot to the writer thread (the
    row first: a kill in between leaves a row that ``--resume`` drops, never a checkpoint
    without its row)."""
    clock = t.clock
    t0 = clock()
    seconds = t0 - epoch.started  # the training loop's time
    _average_bn_buffers(t)
    row = _epoch_row(t, state, epoch, seconds)
    t1 = clock()
    row["val_loss"], row["val_acc"], val_logits = _validate(t)
    improved = row["val_acc"] is not None and (
        state.best_val_acc is None or row["val_acc"] > state.best_val_acc
    )
    # Without a validation split, --ema's averaged weights still go to best.pt, each epoch:
    # the model the run reports on and hands to predict/export is the averaged one.
    improved = improved or (row["val_acc"] is None and t.opt.ema is not None)
    state.next_epoch()
    if improved:
        state.best_val_acc, state.best_epoch = row["val_acc"], state.epoch
    t2 = clock()
    snap = t.saver.snapshot(t.model, t.opt, state, best=improved)
    t3 = clock()
    _log_epoch(t, state, row, seconds, improved)
    for c in callbacks:
        c.epoch_end(t, state, row, val_logits)
    # Seconds of this epoch on the training thread, by what they were spent on.
    row["time"] = {
        "train": round(seconds, 3), "validate": round(t2 - t1, 3), "save": round(t3 - t2, 3),
        "other": round(clock() - t3 + t1 - t0, 3),
    }  # fmt: skip
    if t.process.is_main:
        metrics.append(t.out, row)
    t.saver.write(snap, row)
    return row


def _log_epoch(t: Trainer, state: RunState, row: dict, seconds: float, improved: bool) -> None:
    val_text = (
        f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%"
        if row["val_acc"] is not None
        else "no val split"
    )
    log.info(
        "epoch %d/%d  train loss %.4f acc %.2f%%  %s  %.0f img/s  %.1f s%s",
        state.epoch, t.cfg.train.epochs, row["train_loss"], 100 * row["train_acc"], val_text,
        row["img_per_s"], seconds, "  (best)" if improved else "",
    )  # fmt: skip


def _epoch_row(t: Trainer, state: RunState, epoch: Epoch, seconds: float) -> dict[str, Any]:
    """The epoch's metrics row, training figures summed over every rank."""
    sums = torch.stack(
        [torch.as_tensor(state.sums[k], dtype=torch.float64, device=t.device)
         for k in ("loss", "correct", "seen")]
    )  # fmt: skip
    loss, correct, seen = t.process.all_reduce(sums).tolist()
    seen_here = (state.sums["seen"] - epoch.seen0) * t.process.world_size
    return {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_loss": None,
        "val_acc": None,
        "lr": t.opt.lr,
        "seconds": round(seconds, 2),
        "images": int(seen_here),
        "img_per_s": round(float(seen_here) / seconds, 1),
        "frozen_backbone": t.frozen,
        "steps": list(epoch.step_log),
    }


def _validate(t: Trainer) -> tuple[float | None, float | None, torch.Tensor | None]:
    """Validation loss and accuracy over all ranks' shards (and this rank's logits)."""
    s = t.split
    if not len(s.val_idx):
        return None, None, None
    logits = t.logits(s.val_x, t.opt.evaluated(t.model))
    if len(s.val_y):
        loss_sum = F.cross_entropy(logits, s.val_y, reduction="sum").item()
        correct = float((logits.argmax(1) == s.val_y).sum())
    else:
        loss_sum, correct = 0.0, 0.0
    counts = torch.tensor([loss_sum, correct, len(s.val_y)], dtype=torch.float64, device=t.device)
    totals = t.process.all_reduce(counts).tolist()
    return totals[0] / totals[2], totals[1] / totals[2], logits


def _average_bn_buffers(t: Trainer) -> None:
    """Under torchrun, each rank's BatchNorm running statistics followed its own batches since
    DDP last broadcast rank 0's; average them (as timm's ``distribute_bn``), so that every
    rank validates and saves the same model. A no-op alone or with ``--sync-bn``."""
    if not t.process.distributed:
        return
    models = {id(m): m for m in (t.model, t.opt.evaluated(t.model))}.values()  # and the EMA
    buffers = [
        buf for model in models for name, buf in model.named_buffers()
        if buf.is_floating_point() and ("running_mean" in name or "running_var" in name)
    ]  # fmt: skip
    # One collective for all of them (ResNet-50: 106 buffers, 53k floats): one launch and one
    # latency instead of 106.
    flat = torch.cat([b.flatten() for b in buffers])
    t.process.all_reduce(flat).div_(t.process.world_size)
    for b, averaged in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        b.copy_(averaged.view_as(b))


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


class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to stop at a step boundary; a second Ctrl-C (a second
    later or more) aborts at once.

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
