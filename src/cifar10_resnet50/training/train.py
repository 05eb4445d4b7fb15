"""The ``train`` command: fine-tune ResNet-50 on CIFAR-10 or a folder of images, on one device
or many (torchrun).

Read :func:`run` then :func:`_run` top to bottom: the settings and the run folder
(:func:`_settings`), the built run (``trainer.build``; planned by ``planning`` under
``--budget``; its position restored when resuming), then either the loop (``loop.fit``) or
the linear probe (``probe.fit``), then :func:`_finish`: temperature scaling, the final test
evaluation, ``curves.png`` and the budget's report.

Where each concern lives: ``core`` (optimizer + schedule + scaler, augmented batches, one
step: shared with ``lr_find`` and the budget's timing), ``trainer`` (what a run holds),
``loop`` (epochs and steps, callbacks), ``planning`` + ``budget`` (``--budget``),
``compile_policy`` (``--compile``), ``probe`` (``--strategy linear``), ``metrics``
(``metrics.jsonl``), ``board`` (TensorBoard, a loop callback).

Resume is exact because all randomness in the loop is keyed by (seed, epoch, batch) and
everything else that changes (weights, BatchNorm statistics, optimizer, scheduler, scaler,
position) is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, runtime
from ..config import (
    Config,
    TrainConfig,
    default_image_size,
    flat,
    resolve,
    step_batch,
    uses_tensorboard,
)
from ..data import cifar10
from ..errors import UserError
from ..evaluation import evaluate
from ..fileio import ensure_writable_dir
from ..runtime import Process, pick_device
from . import metrics, planning, probe, trainer
from .board import Board
from .callbacks import Callback
from .learner import Learner
from .trackers import open_trackers
from .trainer import Trainer

log = logging.getLogger(__name__)

# Flags that may differ when resuming: they do not change what the run computes
# (epochs extends or shortens the schedule; the log says so).
# train.out: a run started without --out saved None; resuming names the folder it chose.
# data.data_dir, data.download: where the same CIFAR-10 files are found (their content is
# verified on every load), e.g. another machine's copy.
# train.patience: like epochs, when to stop; train.test_images: the final report only.
RESUMABLE_CHANGES = {
    "train.patience",
    "train.test_images",
    "data.data_dir",
    "data.download",
    "train.epochs",
    "train.progress",
    "train.checkpoint_every",
    "train.compile",
    "train.threads",
    "train.tensorboard",
    "train.tracker",
    "train.out",
}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    last: Path
    best: Path | None
    best_val_acc: float | None
    epochs_done: int
    stopped_early: bool
    test: evaluate.EvalReport | None
    already_finished: bool = False  # --resume of a run that had done all its epochs


def run(
    cfg: Config,
    *,
    resume: bool = False,
    final_eval: bool = True,
    stop_after_steps: int | None = None,
    process: Process | None = None,
    started: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    after_step: Callable[[], None] | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train as ``cfg`` says; returns where the checkpoints are and the final test report.

    ``stop_after_steps`` stops (and saves ``last``) exactly as Ctrl-C does, after that many
    optimizer steps in total: the tests use it to interrupt a run deterministically. Under
    torchrun the process group is set up from the environment and closed at the end.
    ``started``: the ``clock()`` that ``--budget`` counts from (the CLI passes its own start,
    so importing torch counts too). ``clock`` (seconds) and ``after_step`` (called after each
    optimizer step, the budget's timing steps included) let a test run the budget on a clock
    of its own. ``callbacks``: hooks into the loop (``callbacks.Callback``), after TensorBoard's.
    """
    started = clock() if started is None else started  # --budget counts from here
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    own = process is None
    process = process or Process.from_env(pick_device(cfg.train.device).type)
    try:
        timing = {"started": started, "clock": clock, "after_step": after_step}
        return _run(cfg, resume, final_eval, stop_after_steps, process, timing, callbacks or [])
    finally:
        if own:
            process.close()


def _run(
    cfg: Config,
    resume: bool,
    final_eval: bool,
    stop_after: int | None,
    process: Process,
    timing: dict[str, Any],
    callbacks: list[Callback],
) -> TrainResult:
    auto_size = cfg.model.image_size is None  # --budget may choose it
    cfg, out, saved = _settings(cfg, resume, process)
    if saved is not None and _finished(saved["train_state"], cfg.train.epochs, cfg.train.patience):
        return _already_finished(out, saved["train_state"])
    t, state = _start(cfg, out, process, saved, timing, auto_size, final_eval)
    stopped, report = False, None
    trackers = open_trackers(t.cfg.train.tracker, out, t.cfg.to_dict()) if process.is_main else []
    try:
        if t.cfg.train.strategy == "linear":
            probe.fit(t, state)
        else:
            board = Board(
                out / "tensorboard" if uses_tensorboard(t.cfg.train) and process.is_main else None,
                start_step=state.step,
            )
            try:
                learner = Learner(t, state)
                stopped = learner.fit(
                    callbacks=[board, *trackers, *callbacks], stop_after=stop_after
                )
            finally:
                board.close()
        report = _finish(t, final_eval, stopped)
    finally:
        headline = report and {k: report.metrics[k] for k in ("accuracy", "loss", "count")}
        for tracker in trackers:
            tracker.finish(headline, state.step)
    best = t.saver.best if t.saver.best.exists() else None
    return TrainResult(
        out_dir=out, last=t.saver.last, best=best, best_val_acc=state.best_val_acc,
        epochs_done=state.epoch, stopped_early=stopped, test=report,
    )  # fmt: skip


def _finished(saved_state: dict[str, Any], epochs: int, patience: int | None) -> bool:
    """All epochs done, or stopped by ``--patience`` (a resumed run keeps its patience)."""
    state = checkpoint.RunState(saved_state["epoch"], best_epoch=saved_state.get("best_epoch"))
    return state.epoch >= epochs or state.out_of_patience(patience)


def _already_finished(out: Path, saved_state: dict[str, Any]) -> TrainResult:
    done = saved_state["epoch"]
    log.info("%s finished (%d epochs); nothing to do", out, done)
    best = out / "best.pt" if (out / "best.pt").exists() else None
    return TrainResult(
        out_dir=out, last=out / "last.pt", best=best, best_val_acc=saved_state["best_val_acc"],
        epochs_done=done, stopped_early=False, test=None, already_finished=True,
    )  # fmt: skip


def _settings(cfg: Config, resume: bool, process: Process) -> tuple[Config, Path, dict | None]:
    """Resolved settings, run folder and the saved ``last.pt`` (when resuming)."""
    device = process.device(cfg.train.device)
    cfg = resolve(cfg, device.type, process.world_size, gpu_batch=_gpu_batch(cfg, device, process))
    out = trainer.run_folder(cfg.train.out)
    if process.distributed and not cfg.train.out:
        # Every rank must agree on the folder; the minute may differ between them.
        raise UserError("with torchrun, pass --out RUN_DIR (every process must name one folder)")
    # The folder is part of the saved config, so the printed "--resume --out RUN" matches it.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(out)))
    if cfg.data.source == "cifar10" and cfg.data.data_dir is None:
        # Where the data was found ($CIFAR10_DATA_DIR, else the user cache) joins the run's
        # settings, so `--resume` from a shell without that variable still finds it.
        where = str(cifar10.resolve_data_dir(None))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=where))
    last = out / "last.pt"
    if not resume:
        if last.exists():
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return cfg, out, None
    if not last.exists():
        raise UserError(f"--resume: no {last}; pass --out to the run folder to resume")
    saved = checkpoint.load(last)
    for key in check_resume_config(saved["config"], cfg):
        log.info("resume: %s changed from the saved run", key)
    return cfg, out, saved


def _gpu_batch(cfg: Config, device: torch.device, process: Process) -> int:
    """The default batch for this GPU when ``--batch-size`` is not given: what fits the
    card with the least free memory of the job (every rank must use one batch)."""
    if device.type != "cuda" or cfg.train.batch_size is not None:
        return runtime.GPU_BATCHES[0]
    size = cfg.model.image_size or default_image_size("cuda")
    batch = process.least(runtime.gpu_default_batch(device, size), device)
    if batch < runtime.GPU_BATCHES[0]:
        log.info("batch %d per process: what fits this GPU's free memory at %d px", batch, size)
    return batch


def _start(
    cfg: Config,
    out: Path,
    process: Process,
    saved: dict | None,
    timing: dict[str, Any],
    auto_size: bool,
    final_eval: bool,
) -> tuple[Trainer, checkpoint.RunState]:
    """The built run (planned, under --budget) and its position (restored, when resuming)."""
    new_folder = not out.exists()
    t = trainer.build(cfg, out, process, **timing)
    if cfg.train.budget and saved is None:
        try:
            if cfg.train.strategy == "linear":
                planning.plan_probe_budget(t, auto_size)
            else:
                planning.plan_budget(t, auto_size, final_eval)
        except UserError:
            if process.is_main:  # a refused budget leaves nothing behind
                _remove_run_files(out, new_folder)
            raise
    state = checkpoint.RunState()
    if saved is not None:
        state = t.saver.restore(saved, t.model, t.opt)
        log.info(
            "resuming %s at epoch %d, batch %d (step %d)", out, state.epoch + 1, state.batch,
            state.step,
        )  # fmt: skip
        if process.is_main:
            metrics.truncate(out, state.epoch)
    log.info("%s", _describe(t))
    return t, state


def _describe(t: Trainer) -> str:
    """The run in one line, as it will go: the probe has no epochs or steps to show."""
    tc = t.cfg.train
    precision = str(t.amp_dtype).replace("torch.", "") if t.amp_dtype else "fp32"
    images = f"{len(t.batches.rows)} train / {len(t.split.val_x) * t.process.world_size} val images"
    if tc.strategy == "linear":
        return (
            f"linear probe of {t.cfg.model.arch} on {t.device} ({precision}), {t.cfg.model.image_size} px: "
            f"backbone features once (cached), then the head fitted by {tc.probe_solver}; "
            f"weights {t.meta['weights']}, {images} → {t.out}"
        )
    progressive = f" (progressive from {t.size_at(0)} px)" if tc.progressive else ""
    world = t.process.world_size
    return (
        f"training {t.cfg.model.arch} on {t.device} ({precision}), {t.cfg.model.image_size} px"
        f"{progressive}, strategy {tc.strategy}, {tc.epochs} epochs × {t.steps_per_epoch} steps, "
        f"batch {_batch_text(tc)} × {world} process(es) = {step_batch(tc) * world}, weights "
        f"{t.meta['weights']}, {images} → {t.out}"
    )


def _batch_text(tc: TrainConfig) -> str:
    if tc.accum_steps == 1:
        return str(tc.batch_size)
    return f"{tc.batch_size} × {tc.accum_steps} accumulated"


def _finish(t: Trainer, final_eval: bool, stopped: bool) -> evaluate.EvalReport | None:
    """After the loop: temperature scaling and the test report (main process, unless
    stopped), curves.png of the epochs so far (the probe has none), the budget's
    planned-against-actual."""
    report = None
    if t.process.is_main and not stopped:
        with _cores_left_by_the_other_ranks(t):
            _calibrate(t)
            report = _final_evaluation(t) if final_eval else None
    rows = metrics.read(t.out / metrics.NAME)
    if t.process.is_main and rows and t.cfg.train.strategy != "linear":
        from ..evaluation.plots import training_curves

        training_curves(rows, t.out / "curves.png", metrics.curves_title(t.out, rows, report))
    if not stopped:
        planning.report(t)
    return report


@contextlib.contextmanager
def _cores_left_by_the_other_ranks(t: Trainer) -> Iterator[None]:
    """Under torchrun on CPUs each process runs one thread (torchrun sets OMP_NUM_THREADS=1)
    so that together they use the cores; the final evaluation runs on rank 0 alone once the
    others have finished, so it takes the cores they leave, unless --threads says otherwise.
    Measured here (2 ranks, 2 cores, 10,000 test images at 32 px): 22 s on one thread."""
    own, local = torch.get_num_threads(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if t.device.type == "cpu" and local > 1 and not t.cfg.train.threads:
        torch.set_num_threads(min(os.cpu_count() or 1, own * local))
        log.info("final evaluation on rank 0 with %d CPU threads", torch.get_num_threads())
    try:
        yield
    finally:
        torch.set_num_threads(own)


def _calibrate(t: Trainer) -> None:
    """Temperature scaling (Guo et al. 2017) of the weights best.pt holds, fitted on the whole
    validation split: stored in best.pt's metadata and set on the model in memory, so the
    final evaluation, predict, serve and exports return calibrated probabilities."""
    from ..evaluation import calibration

    s = t.split
    if not len(s.val_idx) or not t.saver.best.exists():
        return  # no held-out images: the model stays uncalibrated (temperature 1)
    if t.saver.best_state is None:  # resumed after best.pt was written
        blob = checkpoint.load(t.saver.best)
        t.saver.best_state, t.saver.best_row = blob["model"], blob.get("metrics", {})
    t.model.load_state_dict(t.saver.best_state)
    t.model.temperature.fill_(1.0)
    logits, labels = t.logits(s.arrays.train_x[s.val_idx]), s.arrays.train_y[s.val_idx]
    temperature = calibration.fit_temperature(logits, labels)
    before = calibration.scores(logits, labels)
    after = calibration.scores(logits, labels, temperature)
    log.info(
        "temperature scaling on %d validation images: T = %.3f, ECE %.2f%% → %.2f%%, "
        "NLL %.4f → %.4f",
        len(labels), temperature, 100 * before["ece"], 100 * after["ece"], before["nll"],
        after["nll"],
    )  # fmt: skip
    t.saver.calibrate(temperature)
    t.meta = t.saver.meta
    t.model.temperature.fill_(temperature)


def _final_evaluation(t: Trainer) -> evaluate.EvalReport:
    """The test report of ``best`` (else ``last``), with the model and data already in memory:
    only the best epoch's weights are read back (from the copy kept when it was saved)."""
    best = t.saver.best if t.saver.best.exists() else None
    if best is not None:
        state = t.saver.best_state or checkpoint.load(best)["model"]
        t.model.load_state_dict(state)
    arrays = t.split.arrays
    test_x, test_y = evaluate.test_subset(arrays.test_x, arrays.test_y, t.cfg.train.test_images)
    return evaluate.evaluate_model(
        t.model,
        list(t.meta["classes"]),
        test_x,
        test_y,
        out_dir=ensure_writable_dir(t.out / "eval"),
        source=best or t.saver.last,
        device=t.device,
        amp_dtype=t.amp_dtype,
        batch_size=t.cfg.train.eval_batch_size,
    )


def check_resume_config(saved: dict[str, Any], requested: Config) -> list[str]:
    """Keys that differ between the saved and the requested config; error if any matters."""
    # A setting added since the run was saved counts as its default (what the run used).
    a = {**flat(Config().to_dict()), **flat(saved)}
    b = flat(requested.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        details = ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in blocking[:4])
        raise UserError(
            f"--resume continues a run with its own settings, but these differ ({details}). "
            "Drop those flags, or start a new run with another --out."
        )
    return changed


def _remove_run_files(out: Path, new_folder: bool) -> None:
    """What a run that never started wrote: its folder if it made it, else its own files."""
    import shutil

    if new_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in ("config.json", "splits.json", "plan.json", ".budget-timing.pt"):
        (out / name).unlink(missing_ok=True)
