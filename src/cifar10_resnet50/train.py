"""The ``train`` command: fine-tune ResNet-50 on CIFAR-10.

Read ``run()`` top to bottom: set-up, then one plain loop over epochs and batches. Resume is
exact because all randomness in the loop is keyed by (seed, epoch, batch) and everything else
that changes (weights, BatchNorm statistics, optimizer, scheduler, scaler, position) is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint, data, evaluate
from . import model as model_lib
from .board import Board
from .config import Config, resolve
from .errors import UserError
from .fileio import remove_stale_temps, write_bytes, write_json
from .runtime import Process, autocast, pick_device, pick_precision

log = logging.getLogger(__name__)

# Flags that may differ when resuming: they do not change what the run computes
# (epochs extends or shortens the schedule; the log says so).
# train.out: a run started without --out saved None; resuming names the folder it chose.
RESUMABLE_CHANGES = {
    "train.epochs",
    "train.progress",
    "train.checkpoint_every",
    "train.compile",
    "train.threads",
    "train.tensorboard",
    "train.out",
}
LOG_EVERY = 10  # steps between host syncs (progress bar, NaN check); each sync stalls a GPU


# --------------------------------------------------------------------------- pieces


def param_groups(
    model: model_lib.Classifier, head_lr: float, backbone_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Head and backbone at their own learning rates; no weight decay on BatchNorm or biases
    ("no bias decay", He et al. 2019, Bag of Tricks: decaying them only fights BatchNorm)."""
    groups = []
    for name, params, lr in (
        ("backbone", model.backbone_parameters(), backbone_lr),
        ("head", list(model.head.parameters()), head_lr),
    ):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.append(
            {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
        )
    return groups


def make_optimizer(
    groups: list[dict[str, Any]], name: str, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's peak lr at a step.

    cosine: linear warm-up, then cosine decay to 0.
    onecycle: cosine up from 1/25 over the first 25% (or the warm-up, if longer), then cosine
    down to 1e-4 (fastai's fit_one_cycle shape).
    """

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    up = max(warmup_steps, int(0.25 * total_steps), 1)

    def onecycle(step: int) -> float:
        if step < up:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / up))
        progress = min((step - up) / max(1, total_steps - up), 1.0)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))

    return cosine if schedule == "cosine" else onecycle


def set_backbone_frozen(model: model_lib.Classifier, frozen: bool) -> None:
    for p in model.backbone_parameters():
        p.requires_grad_(not frozen)


def set_train_mode(model: model_lib.Classifier, frozen: bool) -> None:
    """Train mode, except a frozen backbone keeps BatchNorm in eval mode: its running
    statistics stay the ImageNet ones its weights were trained with."""
    model.train()
    if frozen:
        model.net.eval()
        model.head.train()


def frozen_at(strategy: str, epoch: int, freeze_epochs: int) -> bool:
    return strategy == "linear" or (strategy == "gradual" and epoch < freeze_epochs)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict[str, Any], requested: Config) -> list[str]:
    """Keys that differ between the saved and the requested config; error if any matters."""
    a, b = _flatten(saved), _flatten(requested.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        details = ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in blocking[:4])
        raise UserError(
            f"--resume continues a run with its own settings, but these differ ({details}). "
            "Drop those flags, or start a new run with another --out."
        )
    return changed


class StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary (a second Ctrl-C aborts).

    Stopping between steps, never inside one, is what lets the saved ``last`` be exact.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "interrupt: finishing this step, saving 'last', then stopping (Ctrl-C again aborts)"
        )

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_finite(losses: list[torch.Tensor], first_step: int, steps_per_epoch: int) -> None:
    """Raise if any pending loss is NaN/inf, naming the first bad step. One host sync."""
    if not losses:
        return
    values = torch.stack(losses).float()
    bad = torch.nonzero(~torch.isfinite(values)).flatten()
    if len(bad):
        step = first_step + int(bad[0])
        raise UserError(
            f"loss became {values[bad[0]].item()} at step {step + 1} (epoch "
            f"{step // steps_per_epoch + 1}, batch {step % steps_per_epoch + 1}); stopped "
            "without saving. Lower --lr, raise --warmup, or use --precision fp32."
        )


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


# --------------------------------------------------------------------------- the command


def run(
    cfg: Config,
    *,
    resume: bool = False,
    final_eval: bool = True,
    stop_after_steps: int | None = None,
    process: Process | None = None,
) -> TrainResult:
    """Train as ``cfg`` says; returns where the checkpoints are and the final test report.

    ``stop_after_steps`` stops (and saves ``last``) exactly as Ctrl-C does, after that many
    optimizer steps in total: the tests use it to interrupt a run deterministically.
    """
    # ---- device, config, run folder
    process = process or Process.from_env()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    cfg = resolve(cfg, device.type)
    amp_dtype = pick_precision(cfg.train.precision, device)
    t, o, a = cfg.train, cfg.optim, cfg.augment
    out = Path(t.out) if t.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    # The folder is part of the saved config, so the printed "--resume --out RUN" matches it.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, out=str(out)))
    t = cfg.train
    last_path, best_path = out / "last.pt", out / "best.pt"
    saved = None
    if resume:
        saved = checkpoint.load(last_path) if last_path.exists() else None
        if saved is None:
            raise UserError(f"--resume: no {last_path}; pass --out to the run folder to resume")
        for key in check_resume_config(saved["config"], cfg):
            log.info("resume: %s changed from the saved run", key)
        done = saved["train_state"]["epoch"]
        if done >= t.epochs:
            log.info("%s finished all %d epochs; nothing to do", out, done)
            best = best_path if best_path.exists() else None
            return TrainResult(
                out, last_path, best, saved["train_state"]["best_val_acc"], done, False, None, True
            )
    elif last_path.exists():
        raise UserError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    torch.manual_seed(t.seed)

    # ---- data folder checked, then the model: without a network the weights fail in
    # seconds, before any data download. The run folder is created only once both are in
    # hand, so a failed start leaves no folder behind.
    root = data.resolve_data_dir(cfg.data.data_dir)
    data.check_download_target(root, explicit=cfg.data.data_dir is not None)
    model = model_lib.build(cfg.model.weights, cfg.model.image_size, progress=t.progress)

    # ---- data: uint8 tensors on the training device
    if not data.is_present(root) and cfg.data.download and process.is_main:
        data.download(root, progress=t.progress)
    arrays = data.load(root)
    train_idx, val_idx = data.stratified_split(arrays.train_y, cfg.data.val_size, t.seed)
    if cfg.data.subset is not None:
        train_idx = train_idx[: cfg.data.subset]
    train_x = arrays.train_x[train_idx].to(device)  # uint8 [N,3,32,32]
    train_y = arrays.train_y[train_idx].to(device)
    val_x, val_y = arrays.train_x[val_idx], arrays.train_y[val_idx]
    steps_per_epoch = data.steps_per_epoch(len(train_x), t.batch_size, process.world_size)
    if steps_per_epoch == 0:
        raise UserError(
            f"{len(train_x)} training images make no full batch of {t.batch_size}; "
            "lower --batch-size or raise --subset"
        )
    total_steps = steps_per_epoch * t.epochs
    if process.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # a save that was SIGKILLed leaves its temporary file
        write_json(out / "config.json", cfg.to_dict())

    # ---- optimizer, schedule
    pretrained = cfg.model.weights != "none"
    model = model.to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backbone_lr = o.lr * (o.backbone_lr_scale if pretrained else 1.0)
    groups = param_groups(model, o.lr, backbone_lr, o.weight_decay)
    if t.strategy == "linear":
        groups = [g for g in groups if g["name"].startswith("head")]
    optimizer = make_optimizer(groups, o.optimizer, o.momentum)
    warmup_steps = int(o.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(o.schedule, total_steps, warmup_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    meta = model_lib.model_meta(cfg.model.weights, cfg.model.image_size)
    forward = torch.compile(model) if t.compile else model

    # ---- position (and state) to start from
    epoch, batch, step, best_val_acc = 0, 0, 0, None
    sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
    if saved is not None:
        model.load_state_dict(saved["model"])
        ts = saved["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        torch.set_rng_state(ts["rng"]["torch"])
        if device.type == "cuda" and ts["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        epoch, batch, step = ts["epoch"], ts["batch"], ts["step"]
        best_val_acc, sums = ts["best_val_acc"], dict(ts["epoch_sums"])
        log.info("resuming %s at epoch %d, batch %d (step %d)", out, epoch + 1, batch, step)
        if process.is_main:
            _truncate_metrics(out / "metrics.jsonl", epoch)

    def save_best(row: dict[str, Any]) -> None:
        """The model alone (no optimizer state: a third of the size with AdamW), for
        evaluate/predict/export/serve; ``metrics`` says which epoch it is and how it scored."""
        if process.is_main:
            checkpoint.save(
                best_path,
                {
                    "model_meta": meta,
                    "model": model.state_dict(),
                    "config": cfg.to_dict(),
                    "metrics": row,
                },
            )

    def save(path: Path, at_epoch: int, at_batch: int) -> None:
        """Everything ``--resume`` needs to continue exactly from this step."""
        if not process.is_main:
            return
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint.save(
            path,
            {
                "model_meta": meta,
                "model": model.state_dict(),
                "config": cfg.to_dict(),
                "train_state": {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng,
                    "epoch": at_epoch,
                    "batch": at_batch,
                    "step": step,
                    "best_val_acc": best_val_acc,
                    "epoch_sums": dict(sums),
                },
            },
        )

    log.info(
        "training %s on %s (%s), %d px, strategy %s, %d epochs × %d steps, batch %d, "
        "weights %s, %d train / %d val images → %s",
        "resnet50",
        device,
        str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        cfg.model.image_size,
        t.strategy,
        t.epochs,
        steps_per_epoch,
        t.batch_size,
        meta["weights"],
        len(train_x),
        len(val_x),
        out,
    )

    # ---- the loop
    from tqdm import tqdm

    stopped = False
    board = Board(
        out / "tensorboard" if t.tensorboard and process.is_main else None, start_step=step
    )
    with StopFlag() as stop:
        while epoch < t.epochs and not stopped:
            frozen = frozen_at(t.strategy, epoch, t.freeze_epochs)
            set_backbone_frozen(model, frozen)
            set_train_mode(model, frozen)
            bar = tqdm(
                total=steps_per_epoch,
                initial=batch,
                desc=f"epoch {epoch + 1}/{t.epochs}",
                unit="step",
                disable=not (t.progress and process.is_main),
                leave=False,
            )
            t0, seen0, pending, pending_from = time.perf_counter(), sums["seen"], [], step
            for i, xb, yb in data.train_batches(
                train_x,
                train_y,
                batch_size=t.batch_size,
                seed=t.seed,
                epoch=epoch,
                start=batch,
                padding=a.crop_padding,
                flip=a.flip,
                rank=process.rank,
                world_size=process.world_size,
            ):
                target = yb
                if a.mixup > 0 or a.cutmix > 0:
                    mix_gen = torch.Generator(device=device).manual_seed(
                        data.batch_seed(t.seed, epoch, i) + 1
                    )
                    xb, target = data.mix_batch(
                        xb,
                        yb,
                        meta["num_classes"],
                        data.batch_seed(t.seed, epoch, i),
                        mix_gen,
                        a.mixup,
                        a.cutmix,
                    )
                if t.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp_dtype):
                    logits = forward(xb)  # uint8 [B,3,32,32] → float [B,10]
                loss = F.cross_entropy(logits.float(), target, label_smoothing=o.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if o.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step, batch = step + 1, i + 1
                # Running sums stay on the device: no host sync per step.
                pending.append(loss.detach())
                sums["loss"] += loss.detach() * len(yb)
                sums["correct"] += (logits.detach().argmax(1) == yb).sum()
                sums["seen"] += len(yb)
                bar.update(1)
                must_stop = stop.requested or (
                    stop_after_steps is not None and step >= stop_after_steps
                )
                if step % LOG_EVERY == 0 or must_stop or batch == steps_per_epoch:
                    _check_finite(pending, pending_from, steps_per_epoch)
                    window_loss = float(torch.stack(pending).float().mean())
                    pending, pending_from = [], step
                    rate = (sums["seen"] - seen0) * process.world_size / (time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{float(sums['loss']) / sums['seen']:.3f}", img_s=f"{rate:.0f}"
                    )
                    board.step(step, window_loss, scheduler.get_last_lr()[-1], rate)
                if must_stop or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    sums = {k: float(v) for k, v in sums.items()}
                    save(last_path, epoch, batch)
                if must_stop:
                    stopped = True
                    break
            bar.close()
            if stopped:
                log.warning(
                    "stopped at epoch %d, batch %d; '--resume --out %s' continues",
                    epoch + 1,
                    batch,
                    out,
                )
                break

            # ---- end of epoch: validate, log, save
            seconds = time.perf_counter() - t0
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": float(sums["loss"]) / max(sums["seen"], 1),
                "train_acc": float(sums["correct"]) / max(sums["seen"], 1),
                "val_loss": None,
                "val_acc": None,
                "lr": scheduler.get_last_lr()[-1],
                "seconds": round(seconds, 2),
                "img_per_s": round((sums["seen"] - seen0) * process.world_size / seconds, 1),
                "frozen_backbone": frozen,
            }
            if len(val_x):
                val_logits = evaluate.predict_logits(
                    model,
                    val_x,
                    batch_size=t.eval_batch_size,
                    device=device,
                    amp_dtype=amp_dtype,
                    channels_last=t.channels_last,
                )
                vm = evaluate.metrics(val_logits, val_y, meta["num_classes"])
                row["val_loss"], row["val_acc"] = vm["loss"], vm["accuracy"]
                board.predictions(step, val_x, val_logits, val_y, meta["classes"])
            board.epoch(row)
            epoch, batch = epoch + 1, 0
            sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
            improved = row["val_acc"] is not None and (
                best_val_acc is None or row["val_acc"] > best_val_acc
            )
            if improved:
                best_val_acc = row["val_acc"]
            if process.is_main:
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                save(last_path, epoch, 0)
                if improved:
                    save_best(row)
            val_text = (
                f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%"
                if row["val_acc"] is not None
                else "no val split"
            )
            log.info(
                "epoch %d/%d  train loss %.4f acc %.2f%%  %s  %.0f img/s  %.1f s%s",
                epoch,
                t.epochs,
                row["train_loss"],
                100 * row["train_acc"],
                val_text,
                row["img_per_s"],
                seconds,
                "  (best)" if improved else "",
            )

    board.close()

    # ---- wrap up: final test figure on the best (else last) checkpoint, then the curves
    best = best_path if best_path.exists() else None
    report = None
    if final_eval and not stopped and process.is_main:
        report = evaluate.run(
            best or last_path,
            data_dir=root,
            out_dir=out / "eval",
            device=str(device.type),
            precision=t.precision,
            batch_size=t.eval_batch_size,
        )
    rows = _read_metrics(out / "metrics.jsonl")
    if process.is_main and rows:
        from .plots import training_curves

        training_curves(rows, out / "curves.png", _curves_title(out, rows, report))
    return TrainResult(out, last_path, best, best_val_acc, epoch, stopped, report)


def _curves_title(out: Path, rows: list[dict[str, Any]], report: Any) -> str:
    """Run name, best epoch (by validation accuracy) and the final test accuracy, if known."""
    parts = [out.name]
    val = [r for r in rows if r.get("val_acc") is not None]
    if val:
        best = max(val, key=lambda r: r["val_acc"])
        parts.append(f"best epoch {best['epoch']} (val {100 * best['val_acc']:.2f}%)")
    if report is not None:
        parts.append(f"test {100 * report.metrics['accuracy']:.2f}%")
    return " — ".join(parts)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A torn last line (a kill mid-append) is dropped with a
    warning: it belongs to an epoch that was not saved, which a resumed run redoes."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: dropping a torn last line (an interrupted write)", path)
                break
            raise UserError(
                f"{path}: line {number} is not JSON; the file was edited or damaged. "
                "Remove that line to resume."
            ) from None
    return rows


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows of epochs that the resumed run will redo (written after the last save)."""
    rows = [r for r in _read_metrics(path) if r["epoch"] <= epochs_done]
    if path.exists():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        write_bytes(path, text.encode("utf-8"))
