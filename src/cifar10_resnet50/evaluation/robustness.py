"""The corruption sweep: a model's accuracy on CIFAR-10-C generated on the fly
(``corruptions``), per corruption × severity, with the summary figures of Hendrycks &
Dietterich 2019 (mean corruption accuracy and the drop relative to clean accuracy).

The model is any ``classify(uint8 [B,3,H,W]) → predicted class int64 [B]`` function: the
evaluate command passes the in-memory checkpoint model or an export's runner, so every model
file goes through the same sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import corruptions as C
from .calibration import wilson

log = logging.getLogger(__name__)

# Test images for the sweep where none is asked for: on a CPU 2,000 (stratified) keeps the 75
# corrupted sets within ~6 minutes at 64 px on this project's 2-core machine (BENCHMARKS.md);
# on a GPU the whole test set.
DEFAULT_IMAGES = {"cpu": 2000, "cuda": 10000}

CHUNK = 250  # images corrupted at once (memory: a few MB), independent of the model's batch
Classify = Callable[[torch.Tensor], torch.Tensor]


def stratified(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` images, as equal per class as ``n`` allows, seeded; all if n ≥ N."""
    if n >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    per = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    per = [idx[torch.randperm(len(idx), generator=gen)] for idx in per]
    take = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    return torch.cat([idx[:k] for idx, k in zip(per, take, strict=True)]).sort().values


def _accuracy(classify: Classify, images: torch.Tensor, labels: torch.Tensor, batch: int) -> int:
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((classify(images[i : i + batch]).cpu() == labels[i : i + batch]).sum())
    return correct


def sweep(
    classify: Classify,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 500,
    names: tuple[str, ...] = C.CORRUPTIONS,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy on the clean ``images`` (uint8 [N,3,H,W]) and on each corruption × severity.

    Returns plain data (the robustness.json): counts, accuracies with 95 % Wilson intervals,
    the mean corruption accuracy (over all corruptions and severities) and the relative drop
    ``1 − mean corruption accuracy / clean accuracy``.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    n = len(labels)
    clean = _accuracy(classify, images, labels, batch_size)
    table: dict[str, list[float]] = {}
    bar = tqdm(total=len(names) * len(C.SEVERITIES), desc="corruptions", disable=not progress)
    for name in names:
        row = []
        for severity in C.SEVERITIES:
            correct = 0
            for i in range(0, n, CHUNK):  # chunks keyed by position: same images, same noise
                batch = C.corrupt(images[i : i + CHUNK], name, severity, seed * 100_003 + i)
                correct += _accuracy(classify, batch, labels[i : i + CHUNK], batch_size)
            row.append(correct / n)
            bar.update(1)
        table[name] = row
    bar.close()
    mean = sum(sum(r) for r in table.values()) / (len(table) * len(C.SEVERITIES))
    clean_acc = clean / n
    return {
        "images": n,
        "seed": seed,
        "clean_accuracy": clean_acc,
        "clean_ci95": wilson(clean, n),
        "accuracy": table,  # corruption → [severity 1..5]
        "ci95": {k: [wilson(round(a * n), n) for a in v] for k, v in table.items()},
        "per_corruption": {k: sum(v) / len(v) for k, v in table.items()},
        "per_severity": [sum(r[s] for r in table.values()) / len(table) for s in range(5)],
        "mean_corruption_accuracy": mean,
        "relative_drop": 1 - mean / clean_acc if clean_acc else None,
        "frost": "generated texture, not the CIFAR-10-C photographs",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(report: dict[str, Any]) -> str:
    """The printed summary: clean, mean corruption accuracy, per corruption and severity."""
    lines = [
        f"corruptions on {report['images']:,} test images (seed {report['seed']}, "
        f"{report['seconds']:.0f} s)",
        f"clean accuracy            {100 * report['clean_accuracy']:.2f}%",
        f"mean corruption accuracy  {100 * report['mean_corruption_accuracy']:.2f}%   "
        f"(relative drop {100 * (report['relative_drop'] or 0):.1f}%)",
        "",
        f"{'corruption':<20}" + "".join(f"{s:>7}" for s in C.SEVERITIES) + "   mean",
    ]
    for name, row in report["accuracy"].items():
        cells = "".join(f"{100 * a:>6.1f}%" for a in row)
        lines.append(f"{name:<20}{cells}  {100 * report['per_corruption'][name]:>5.1f}%")
    return "\n".join(lines)


def heatmap_png(report: dict[str, Any], path: Path, title: str) -> None:
    """Accuracy per corruption (rows, grouped) × severity (columns), annotated."""
    from . import plots

    names = list(report["accuracy"])
    values = [[100 * a for a in report["accuracy"][n]] for n in names]
    plots.heatmap_png(
        values,
        rows=names,
        columns=[f"severity {s}" for s in C.SEVERITIES],
        path=path,
        title=f"{title}\nclean {100 * report['clean_accuracy']:.1f}% (95% CI "
        f"{100 * report['clean_ci95'][0]:.1f}–{100 * report['clean_ci95'][1]:.1f}), mean corrupted "
        f"{100 * report['mean_corruption_accuracy']:.1f}% ({report['images']:,} images)",
    )
