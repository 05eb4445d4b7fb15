"""PNG figures (matplotlib, headless): training curves, confusion matrices, image grids and
the lr range test. Each ``*_figure`` returns a figure (TensorBoard takes those too); each
``*_png`` writes one atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _save(fig, path: str | Path) -> None:
    """Render in memory, then write atomically (a full disk is one clear error, no torn PNG)."""
    import io

    from ..fileio import write_bytes

    buf = io.BytesIO()
    # "tight": the canvas grows to hold every title, label and tick (a long title was cut)
    fig.savefig(buf, dpi=100, format="png", bbox_inches="tight", pad_inches=0.15)
    write_bytes(path, buf.getbuffer())


def _wrapped(text: str, fig, fontsize: float = 12.0, share: float = 1.0) -> str:
    """``text`` broken into lines that fit ``share`` of the figure's width (an average
    character is ~0.55 em wide), so a long title wraps instead of running off the canvas."""
    import textwrap

    chars = max(20, int(share * fig.get_figwidth() * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig, path: str | Path) -> None:
    plt = pyplot()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def training_curves(rows: list[dict[str, Any]], path: str | Path, title: str | None = None) -> None:
    write_figure(training_curves_figure(rows, title), path)


def training_curves_figure(rows: list[dict[str, Any]], title: str | None = None):
    """Loss and learning rate per logged step (the rows' ``steps``: every 10 steps), accuracy
    per epoch, all against the optimizer step, from the metrics.jsonl rows. A one-epoch run
    still shows how its loss fell and its schedule (rows from before per-step logging fall
    back to one point per epoch)."""
    plt = pyplot()
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    logged = [s for r in rows for s in r.get("steps", [])]
    ends = [r["step"] for r in rows]
    marker = "o-" if len(rows) > 1 else "o"
    if logged:
        ax_loss.plot([s[0] for s in logged], [s[1] for s in logged], label="train (per 10 steps)")
        ax_lr.plot([s[0] for s in logged], [s[2] for s in logged], color="tab:green")
    else:
        ax_loss.plot(ends, [r["train_loss"] for r in rows], marker, label="train")
        ax_lr.plot(ends, [r["lr"] for r in rows], marker, color="tab:green")
    ax_acc.plot(ends, [100 * r["train_acc"] for r in rows], marker, label="train")
    val = [r for r in rows if r.get("val_acc") is not None]
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker, label="val")
        ax_acc.plot(
            [r["step"] for r in val], [100 * r["val_acc"] for r in val], marker, label="val"
        )
    for r in rows if len(rows) <= 3 else []:  # few epochs: the figures, written out
        for value in (r["train_acc"], r.get("val_acc")):
            if value is not None:
                ax_acc.annotate(f"{100 * value:.1f}%", (r["step"], 100 * value),
                                textcoords="offset points", xytext=(6, 4), fontsize=8)  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="accuracy (end of each epoch)")
    ax_acc.set_ylim(0, 100)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate (head)")
    if ends:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.set_xlim(0, max(ends) * 1.04 + 1)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.legend(loc="lower right")
    if title:
        fig.suptitle(_wrapped(title, fig))
    return fig


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str):
    """Counts beside the row-normalised matrix (each row: where that true class went)."""
    import numpy as np

    plt = pyplot()
    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), layout="constrained")
    for ax, values, name, fmt in (
        (axes[0], counts, "counts", "{:d}"),
        (axes[1], rates, "row-normalised (recall per class)", "{:.2f}"),
    ):
        im = ax.imshow(values, cmap="Blues")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set(xlabel="predicted", ylabel="true", title=name)
        top = values.max() or 1
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                ax.text(
                    j,
                    i,
                    fmt.format(int(v) if fmt == "{:d}" else float(v)),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > top / 2 else "black",
                )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(_wrapped(title, fig))
    return fig


def confusion_png(
    confusion: list[list[int]], classes: list[str], path: str | Path, title: str = ""
) -> None:
    write_figure(confusion_figure(confusion, classes, title or "confusion matrix"), path)


def grid_figure(images, titles: list[str], ok: list[bool] | None = None, columns: int = 8):
    """uint8 ``[N,3,H,W]`` images in a grid, each with its title (red when ``ok`` is False)."""
    plt = pyplot()
    n = len(images)
    columns = min(columns, n) or 1
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False, layout="constrained"
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            color = "black" if ok is None or ok[i] else "tab:red"
            ax.set_title(titles[i], fontsize=7, color=color)
    return fig


def grid_png(images, titles: list[str], path: str | Path, ok: list[bool] | None = None) -> None:
    write_figure(grid_figure(images, titles, ok), path)


def lr_find_png(lrs: list[float], losses: list[float], suggested: float, path: str | Path) -> None:
    write_figure(lr_find_figure(lrs, losses, suggested), path)


def lr_find_figure(lrs: list[float], losses: list[float], suggested: float):
    """Smoothed loss against learning rate (log scale), with the suggestion marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested --lr {suggested:.1e}")
    top = min(max(losses), 2.5 * min(losses))  # the explosion at the end would hide the valley
    ax.set_ylim(min(losses) * 0.95, top * 1.02)
    ax.set(xlabel="learning rate (head)", ylabel="smoothed training loss", title="lr range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def reliability_png(curves: dict[str, list], path: str | Path, title: str) -> None:
    write_figure(reliability_figure(curves, title), path)


def reliability_figure(curves: dict[str, list], title: str):
    """Reliability diagram: accuracy against confidence per bin (``calibration.Bin`` lists,
    one per label), the diagonal being perfect calibration; bin counts below."""
    plt = pyplot()
    fig, (ax, ax_n) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]},
        layout="constrained",
    )  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    for (label, bins), marker in zip(curves.items(), "os^", strict=False):
        from .calibration import ece_of

        full = [b for b in bins if b.count]
        ece = ece_of(bins)
        ax.plot(
            [b.confidence for b in full],
            [b.accuracy for b in full],
            marker + "-",
            label=f"{label} (ECE {100 * ece:.2f}%)",
        )
        ax_n.bar(
            [(b.lower + b.upper) / 2 for b in bins],
            [b.count for b in bins],
            width=bins[0].upper - bins[0].lower,
            alpha=0.5,
            label=label,
        )
    ax.set(ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(_wrapped(title, fig, share=0.85))
    ax_n.set(xlabel="confidence (top-1 probability)", ylabel="images")
    for a in (ax, ax_n):
        a.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return fig


def heatmap_png(
    values: list[list[float]], *, rows: list[str], columns: list[str], path: str | Path, title: str
) -> None:
    write_figure(heatmap_figure(values, rows=rows, columns=columns, title=title), path)


def heatmap_figure(values: list[list[float]], *, rows: list[str], columns: list[str], title: str):
    """A table of percentages as a heatmap, each cell annotated (the robustness sweep)."""
    plt = pyplot()
    fig, ax = plt.subplots(
        figsize=(1.4 * len(columns) + 3, 0.42 * len(rows) + 1.8), layout="constrained"
    )
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(_wrapped(title, fig, fontsize=10, share=0.8), fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    return fig
