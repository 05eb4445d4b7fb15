"""Evaluation: logits over a tensor of images, metrics, and the ``evaluate`` command."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import checkpoint, data
from ..errors import UserError
from ..fileio import check_not_input, ensure_writable_dir, write_json
from ..runtime import autocast, pick_device, pick_precision
from . import robustness
from .settings import EvaluateOptions

log = logging.getLogger(__name__)

OUTPUTS = ("metrics.json", "confusion.json", "confusion.png", "top_losses.png", "reliability.png")
ROBUSTNESS_OUTPUTS = ("robustness.json", "robustness.png")  # with --corruptions


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


def metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> dict[str, Any]:
    """Loss, accuracy and per-class accuracy with 95 % Wilson intervals, the confusion matrix
    (rows: true class), and calibration (ECE, NLL, Brier) of the probabilities as served;
    ``logits`` float [N,C] are the model's output, already divided by its ``temperature``:
    with one other than 1, the scores before scaling are reported too."""
    from .calibration import scores, wilson

    labels = labels.cpu()
    pred = logits.argmax(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    right, total = confusion.diag(), confusion.sum(1)
    per_class = right.double() / total.clamp(min=1).double()
    calibration: dict[str, Any] = {"temperature": temperature, **scores(logits, labels)}
    if temperature != 1.0:
        calibration["before_scaling"] = scores(logits * temperature, labels)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((pred == labels).double().mean()),
        "accuracy_ci95": wilson(int((pred == labels).sum()), len(labels)),
        "per_class_accuracy": per_class.tolist(),
        "per_class_ci95": [wilson(int(r), int(n)) for r, n in zip(right, total, strict=True)],
        "calibration": calibration,
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
    robustness: dict[str, Any] | None = None  # the corruption sweep, when asked for

    def table(self) -> str:
        m = self.metrics
        autocast = self.precision in ("bfloat16", "float16")
        note = " (export's parity check runs fp32: ±0.1 point)" if autocast else ""
        lines = [
            f"checkpoint {self.checkpoint}",
            f"test images {m['count']}   TTA {'flip' if self.tta else 'off'}   "
            f"precision {self.precision}{note}",
            f"accuracy    {100 * m['accuracy']:.2f}%  (95% CI {_ci(m['accuracy_ci95'])})",
            f"loss        {m['loss']:.4f}",
            *_calibration_lines(m.get("calibration")),
            "",
            f"{'class':<12}{'accuracy':>9}  95% CI",
        ]
        for name, acc, ci in zip(
            self.classes, m["per_class_accuracy"], m["per_class_ci95"], strict=True
        ):
            lines.append(f"{name:<12}{100 * acc:>8.1f}%  {_ci(ci, 1)}")
        confused = m.get("most_confused") or []
        if confused:
            lines.append("")
            lines.append("most confused (true → predicted: images)")
            for c in confused:
                lines.append(f"  {c['true']} → {c['predicted']}: {c['count']}")
        lines.append("")
        lines.append(f"confusion matrix: {self.out_dir / 'confusion.png'} (and .json)")
        lines.append(f"top losses:       {self.out_dir / 'top_losses.png'}")
        lines.append(f"reliability:      {self.out_dir / 'reliability.png'}")
        if self.robustness is not None:
            lines += ["", robustness.table(self.robustness)]
            lines.append(f"robustness:       {self.out_dir / 'robustness.png'} (and .json)")
        return "\n".join(lines)


def _ci(interval: tuple[float, float] | list[float], digits: int = 2) -> str:
    return f"{100 * interval[0]:.{digits}f}–{100 * interval[1]:.{digits}f}%"


def _calibration_lines(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    line = f"ECE         {100 * c['ece']:.2f}%   NLL {c['nll']:.4f}   Brier {c['brier']:.4f}"
    before = c.get("before_scaling")
    if before is None:
        return [line + "   (not temperature-scaled)"]
    return [
        line + f"   (temperature {c['temperature']:.3f})",
        f"  unscaled  {100 * before['ece']:.2f}%   NLL {before['nll']:.4f}   "
        f"Brier {before['brier']:.4f}",
    ]


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


def resolve_model(path: str | Path) -> Path:
    """A run folder means its best.pt (else last.pt); a file is itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise UserError(f"{p}: a folder without best.pt or last.pt; pass a run folder or a model")
    if not p.is_file():
        raise UserError(f"{p}: no such file or run folder")
    return p


def test_subset(
    x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images a report covers: all, or ``n`` stratified ones (``--test-images``, for
    quick checks; the log says the figures are not comparable)."""
    if n is None or n >= len(y):
        return x, y
    log.warning(
        "test report on %d of %d test images (--test-images): quick-check figures, not "
        "comparable with full test-set ones", n, len(y),
    )  # fmt: skip
    idx = robustness.stratified(y, n, seed)
    return x[idx], y[idx]


def run(
    model_path: str | Path,
    *,
    data_source: str | None = EvaluateOptions.data_source,
    data_dir: str | None = EvaluateOptions.data_dir,
    out_dir: str | Path | None = EvaluateOptions.out_dir,
    device: str = EvaluateOptions.device,
    precision: str = EvaluateOptions.precision,
    batch_size: int = EvaluateOptions.batch_size,
    tta_flip: bool = EvaluateOptions.tta_flip,
    test_images: int | None = EvaluateOptions.test_images,
    plot: bool = True,
    corruptions: bool = EvaluateOptions.corruptions,
    corruption_images: int | None = EvaluateOptions.corruption_images,
    seed: int = EvaluateOptions.seed,
    allow_code: bool = EvaluateOptions.allow_code,
    progress: bool = True,
) -> EvalReport:
    """Evaluate a model file — a checkpoint, or a TorchScript/ONNX (fp32 or int8) export — on
    the test set of the data it was trained on (or ``data_source``) and write the reports (see
    :func:`evaluate_model`); with
    ``corruptions``, also the CIFAR-10-C sweep (``robustness.json``, ``robustness.png``)."""
    model_path = resolve_model(model_path)
    dev = pick_device(device)
    # The model first: a wrong path (a folder, an image) must not leave an empty eval/ behind.
    model, meta, amp, kind = _load(
        model_path, dev, pick_precision(precision, dev), tta_flip, allow_code, batch_size
    )
    # With TTA, its own folder: the report without it (training's) is kept to compare with.
    out = Path(out_dir) if out_dir else model_path.parent / ("eval-tta" if tta_flip else "eval")
    if (out / "metrics.json").exists():
        log.info("replacing the report in %s", out)
    for name in OUTPUTS + (ROBUSTNESS_OUTPUTS if corruptions else ()):
        check_not_input(out / name, [model_path])
    ensure_writable_dir(out)
    arrays = data.for_model(meta, data_source, data_dir, progress)
    if corruptions and arrays.source != "cifar10":
        raise UserError("--corruptions is CIFAR-10-C: its parameters are for CIFAR-10's images")
    kwargs = dict(device=dev, amp_dtype=amp, batch_size=batch_size)
    test_x, test_y = test_subset(arrays.test_x, arrays.test_y, test_images)
    report = evaluate_model(
        model, list(meta["classes"]), test_x, test_y, out_dir=out,
        source=model_path, tta_flip=tta_flip, plot=plot, precision_name=kind, **kwargs,
    )  # fmt: skip
    if corruptions:
        n = corruption_images or robustness.DEFAULT_IMAGES[dev.type]
        sweep = corruption_report(
            model, arrays.test_x, arrays.test_y, n=n, seed=seed, out_dir=out,
            source=model_path, progress=progress, **kwargs,
        )  # fmt: skip
        report = dataclasses.replace(report, robustness=sweep)
    return report


def _load(
    model_path: Path,
    dev: torch.device,
    amp: torch.dtype | None,
    tta_flip: bool,
    allow_code: bool,
    batch_size: int,
) -> tuple[torch.nn.Module, dict[str, Any], torch.dtype | None, str | None]:
    """(model, meta, autocast dtype, precision column) of a checkpoint or an export. The
    column is None for checkpoints (their autocast dtype names it)."""
    from ..serving import inference

    if inference.detect_backend(model_path) == "torch":
        model, meta = checkpoint.load_model(model_path, dev)
        return model.to(memory_format=torch.channels_last), meta, amp, None
    # An export: its own runner, probabilities → log-probabilities as logits.
    if tta_flip:
        raise UserError("--tta works on checkpoints; exports are evaluated as they are")
    predictor = inference.load(model_path, allow_code=allow_code, batch_size=batch_size)
    kind = f"{inference.detect_backend(model_path)} {predictor.meta.get('precision', 'fp32')}"
    return _ExportModel(predictor), predictor.meta, None, kind


class _ExportModel(torch.nn.Module):
    """An export's runner as a module returning log-probabilities (softmax of which gives back
    its probabilities), so exports go through the same scoring as checkpoints. Runs on the
    CPU (ONNX Runtime, TorchScript on CPU)."""

    def __init__(self, predictor: Any):
        super().__init__()
        self.predictor = predictor
        self.temperature = float(predictor.meta.get("temperature", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.predictor.run(x.contiguous().cpu().numpy())
        return torch.from_numpy(probs).clamp_min(1e-12).log()


def corruption_report(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    n: int,
    seed: int,
    out_dir: Path,
    source: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int,
    progress: bool = True,
) -> dict[str, Any]:
    """The CIFAR-10-C sweep of an in-memory model on a stratified ``n`` of ``images``:
    robustness.json and robustness.png in ``out_dir``; returns the report."""
    chosen = robustness.stratified(labels, n, seed)

    def classify(batch: torch.Tensor) -> torch.Tensor:
        logits = predict_logits(
            model, batch, batch_size=batch_size, device=device, amp_dtype=amp_dtype
        )
        return logits.argmax(1)

    result = robustness.sweep(
        classify, images[chosen], labels[chosen], seed=seed, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    result["model"] = str(source)
    write_json(out_dir / "robustness.json", result)
    robustness.heatmap_png(result, out_dir / "robustness.png", source.name)
    log.info(
        "mean corruption accuracy %.2f%% (clean %.2f%%, %d images)",
        100 * result["mean_corruption_accuracy"], 100 * result["clean_accuracy"], n,
    )  # fmt: skip
    return result


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
    precision_name: str | None = None,
) -> EvalReport:
    """Score an in-memory model on uint8 ``images [N,3,H,W]`` and write, in ``out_dir``:
    metrics.json (with the most-confused pairs), confusion.json, confusion.png (counts and
    row-normalised) and top_losses.png (the images it got most wrong)."""
    logits = predict_logits(
        model, images, batch_size=batch_size, device=device, amp_dtype=amp_dtype, tta_flip=tta_flip
    )
    temperature = float(getattr(model, "temperature", 1.0))
    result = metrics(logits, labels, len(classes), temperature)
    result["most_confused"] = most_confused(result["confusion"], classes)
    if precision_name is None:
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
            f"{source.name}: test accuracy {100 * result['accuracy']:.2f}% "
            f"(95% CI {_ci(result['accuracy_ci95'])}, {len(labels):,} images)"
        )
        plots.confusion_png(result["confusion"], classes, out_dir / "confusion.png", title)
        top_losses_png(logits, images, labels, classes, out_dir / "top_losses.png")
        _reliability_png(logits, labels, temperature, out_dir / "reliability.png", source.name)
    log.info("test accuracy %.2f%% (%d images)", 100 * result["accuracy"], result["count"])
    return EvalReport(source, out_dir, result, classes, tta_flip, precision_name)


def _reliability_png(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, path: Path, name: str
) -> None:
    """Reliability diagram of the served probabilities (and of the unscaled ones when the
    model carries a temperature)."""
    from . import plots
    from .calibration import reliability, wilson

    curves = {f"temperature {temperature:.2f}": reliability(logits.softmax(1), labels)}
    if temperature != 1.0:
        curves = {"unscaled": reliability((logits * temperature).softmax(1), labels), **curves}
    right = int((logits.argmax(1) == labels).sum())
    ci = _ci(wilson(right, len(labels)))
    title = f"{name}: reliability on {len(labels):,} test images (accuracy 95% CI {ci})"
    plots.reliability_png(curves, path, title)


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
