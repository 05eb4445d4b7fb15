"""Evaluation: logits over a tensor of images, metrics, and the ``evaluate`` command."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint, data
from .fileio import check_not_input, ensure_writable_dir, write_json
from .runtime import autocast, pick_device, pick_precision

log = logging.getLogger(__name__)

OUTPUTS = ("metrics.json", "confusion.json", "confusion.png", "top_losses.png")


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = True,
    tta_flip: bool = False,
) -> torch.Tensor:
    """Logits ``float32 [N,C]`` on the CPU for uint8 ``images [N,3,H,W]`` (any device).

    With ``tta_flip`` the logits of each image and its mirror image are averaged.
    """
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(xb).float()
            if tta_flip:
                logits = (logits + model(xb.flip(3)).float()) / 2
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class)."""
    labels = labels.cpu()
    pred = logits.argmax(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((pred == labels).double().mean()),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
        "count": len(labels),
    }


@dataclass(frozen=True)
class EvalReport:
    checkpoint: Path
    out_dir: Path
    metrics: dict[str, Any]
    classes: list[str]
    tta: bool
    precision: str = "fp32"

    def table(self) -> str:
        m = self.metrics
        note = "" if self.precision == "fp32" else " (export's parity check runs fp32: ±0.1 point)"
        lines = [
            f"checkpoint {self.checkpoint}",
            f"test images {m['count']}   TTA {'flip' if self.tta else 'off'}   "
            f"precision {self.precision}{note}",
            f"accuracy    {100 * m['accuracy']:.2f}%",
            f"loss        {m['loss']:.4f}",
            "",
            f"{'class':<12}{'accuracy':>9}",
        ]
        for name, acc in zip(self.classes, m["per_class_accuracy"], strict=True):
            lines.append(f"{name:<12}{100 * acc:>8.1f}%")
        confused = m.get("most_confused") or []
        if confused:
            lines.append("")
            lines.append("most confused (true → predicted: images)")
            for c in confused:
                lines.append(f"  {c['true']} → {c['predicted']}: {c['count']}")
        lines.append("")
        lines.append(f"confusion matrix: {self.out_dir / 'confusion.png'} (and .json)")
        lines.append(f"top losses:       {self.out_dir / 'top_losses.png'}")
        return "\n".join(lines)


def most_confused(confusion: list[list[int]], classes: list[str], k: int = 5) -> list[dict]:
    """The ``k`` largest off-diagonal cells: which true class is most often taken for which."""
    cells = [
        (count, i, j)
        for i, row in enumerate(confusion)
        for j, count in enumerate(row)
        if i != j and count > 0
    ]
    return [
        {"true": classes[i], "predicted": classes[j], "count": count}
        for count, i, j in sorted(cells, reverse=True)[:k]
    ]


def run(
    checkpoint_path: str | Path,
    *,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 500,
    tta_flip: bool = False,
    plot: bool = True,
) -> EvalReport:
    """Evaluate a checkpoint on the CIFAR-10 test set and write the reports (see
    :func:`evaluate_model`)."""
    checkpoint_path = Path(checkpoint_path)
    dev = pick_device(device)
    amp = pick_precision(precision, dev)
    # The model first: a wrong path (a folder, an image) must not leave an empty eval/ behind.
    model, meta = checkpoint.load_model(checkpoint_path, dev)
    out = Path(out_dir) if out_dir else checkpoint_path.parent / "eval"
    for name in OUTPUTS:
        check_not_input(out / name, [checkpoint_path])
    ensure_writable_dir(out)
    model = model.to(memory_format=torch.channels_last)
    arrays = data.load(data.resolve_data_dir(data_dir))
    return evaluate_model(
        model,
        list(meta["classes"]),
        arrays.test_x,
        arrays.test_y,
        out_dir=out,
        source=checkpoint_path,
        device=dev,
        amp_dtype=amp,
        batch_size=batch_size,
        tta_flip=tta_flip,
        plot=plot,
    )


def evaluate_model(
    model: torch.nn.Module,
    classes: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    out_dir: Path,
    source: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int,
    tta_flip: bool = False,
    plot: bool = True,
) -> EvalReport:
    """Score an in-memory model on uint8 ``images [N,3,H,W]`` and write, in ``out_dir``:
    metrics.json (with the most-confused pairs), confusion.json, confusion.png (counts and
    row-normalised) and top_losses.png (the images it got most wrong)."""
    logits = predict_logits(
        model, images, batch_size=batch_size, device=device, amp_dtype=amp_dtype, tta_flip=tta_flip
    )
    result = metrics(logits, labels, len(classes))
    result["most_confused"] = most_confused(result["confusion"], classes)
    precision_name = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    write_json(
        out_dir / "metrics.json",
        {
            "checkpoint": str(source),
            "tta": "flip" if tta_flip else "none",
            "precision": precision_name,
            "classes": classes,
            **{k: v for k, v in result.items() if k != "confusion"},
        },
    )
    write_json(
        out_dir / "confusion.json", {"classes": classes, "rows_true_cols_pred": result["confusion"]}
    )
    if plot:
        from . import plots

        title = (
            f"{source.name}: test accuracy {100 * result['accuracy']:.2f}% ({len(labels):,} images)"
        )
        plots.confusion_png(result["confusion"], classes, out_dir / "confusion.png", title)
        top_losses_png(logits, images, labels, classes, out_dir / "top_losses.png")
    log.info("test accuracy %.2f%% (%d images)", 100 * result["accuracy"], result["count"])
    return EvalReport(source, out_dir, result, classes, tta_flip, precision_name)


def top_losses_png(
    logits: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    path: Path,
    k: int = 24,
) -> None:
    """fastai's ``plot_top_losses``: the ``k`` images with the highest loss, each titled
    predicted / true / probability of the prediction."""
    from . import plots

    losses = F.cross_entropy(logits, labels.cpu(), reduction="none")
    order = losses.argsort(descending=True)[:k]
    probs = torch.softmax(logits[order], dim=1)
    conf, pred = probs.max(1)
    titles = [
        f"{classes[p]} {100 * c:.0f}%\ntrue {classes[t]}"
        for p, c, t in zip(pred.tolist(), conf.tolist(), labels.cpu()[order].tolist(), strict=True)
    ]
    ok = [p == t for p, t in zip(pred.tolist(), labels.cpu()[order].tolist(), strict=True)]
    plots.grid_png(images[order.to(images.device)].cpu(), titles, path, ok)
