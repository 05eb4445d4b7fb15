"""Every figure the project writes keeps its text on the canvas: titles (long run names and
confidence intervals included), tick labels, colour bars and annotations. (Before: the
reliability diagram's title was cut off, and the confusion matrix's last colour-bar tick.)"""

from __future__ import annotations

import pytest
import torch

from cifar10_resnet50.data.cifar10 import CLASSES
from cifar10_resnet50.evaluation import calibration, compare, plots

LONG = "runs/20261130-021500-a-long-experiment-name-resnet50-160px-adamw-cutmix/best.pt"


def _texts_outside_the_canvas(fig) -> list[str]:
    """The titles that run off the canvas, and the drawn artists' bounding box when it does
    (tick labels outside an axis's view are not drawn, so only the box counts for them)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    titles = [fig._suptitle] + [t for ax in fig.axes for t in (ax.title, ax._left_title, ax._right_title)]  # fmt: skip
    outside = []
    for text in titles:
        if text is None or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
            outside.append(f"title {text.get_text()!r} at {box}")
    drawn, canvas = fig.get_tightbbox(renderer), fig.bbox_inches  # inches
    margin = 0.02
    if (drawn.x0 < -margin or drawn.y0 < -margin or drawn.x1 > canvas.x1 + margin
            or drawn.y1 > canvas.y1 + margin):  # fmt: skip
        outside.append(f"drawn artists span {drawn}, the canvas {canvas}")
    return outside


def _rows(epochs: int) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        steps = [[s, 2.3 - 0.01 * s, 1e-3 * (1 - s / (40 * epochs))] for s in range(40 * e - 30, 40 * e + 1, 10)]  # fmt: skip
        rows.append({"epoch": e, "step": 40 * e, "train_loss": 2.0 / e, "train_acc": 0.3 * e / epochs,
                     "val_loss": 2.1 / e, "val_acc": 0.28 * e / epochs, "lr": steps[-1][2],
                     "steps": steps})  # fmt: skip
    return rows


def _reliability_curves():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=g), 1)
    labels = torch.randint(0, 10, (500,), generator=g)
    return {"uncalibrated": calibration.reliability(probs, labels),
            "T = 1.31": calibration.reliability(probs, labels)}  # fmt: skip


FIGURES = {
    "curves, one epoch": lambda: plots.training_curves_figure(_rows(1), f"{LONG} — best epoch 1 (val 28.00%) — test 27.90%"),
    "curves, ten epochs": lambda: plots.training_curves_figure(_rows(10), LONG),
    "confusion": lambda: plots.confusion_figure([[900 + i if i == j else 11 for j in range(10)] for i in range(10)], list(CLASSES), f"{LONG}: 10,000 test images, accuracy 91.23% (95% CI 90.66–91.77%)"),
    "reliability": lambda: plots.reliability_figure(_reliability_curves(), f"{LONG}: reliability on 10,000 test images (accuracy 95% CI 90.66–91.77%)"),
    "lr range test": lambda: plots.lr_find_figure([1e-7 * 1.2**i for i in range(100)], [2.3 - 0.01 * i for i in range(100)], 3.35e-4),
    "robustness": lambda: plots.heatmap_figure([[80.0 - i - j for j in range(6)] for i in range(15)], rows=[f"corruption_{i}" for i in range(15)], columns=["1", "2", "3", "4", "5", "mean"], title=f"{LONG}: accuracy under corruption (%)"),
    "grid": lambda: plots.grid_figure(torch.zeros(16, 3, 32, 32, dtype=torch.uint8), [f"automobile → truck {i}" for i in range(16)]),
    "compare": lambda: compare.comparison_figure([compare.Row(LONG, LONG, 0.91, (0.905, 0.915), 0.7, 0.03, 1.3, 94.0, 310.0), compare.Row("b.onnx", "b.onnx", 0.9, (0.89, 0.91), 0.69, 0.02, 1.0, 23.0, 900.0)], 1000),
}  # fmt: skip


@pytest.mark.parametrize("name", FIGURES)
def test_no_text_is_cut_off(name):
    fig = FIGURES[name]()
    try:
        assert _texts_outside_the_canvas(fig) == []
    finally:
        plots.pyplot().close(fig)


def test_one_epoch_curves_show_the_loss_per_step_and_the_schedule():
    fig = plots.training_curves_figure(_rows(1))
    try:
        ax_loss, _, ax_lr = fig.axes[:3]
        assert len(ax_loss.lines[0].get_xdata()) == 4  # steps 10, 20, 30, 40, not one dot
        assert len(set(ax_lr.lines[0].get_ydata())) == 4  # the lr moves within the epoch
        assert ax_loss.get_xlim()[1] > 40 > 10 > ax_loss.get_xlim()[0]
    finally:
        plots.pyplot().close(fig)
