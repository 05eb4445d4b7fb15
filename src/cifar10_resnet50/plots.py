"""PNG figures: training curves and the confusion matrix (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _save(fig, path: str | Path) -> None:
    """Render in memory, then write atomically (a full disk is one clear error, no torn PNG)."""
    import io

    from .fileio import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    write_bytes(path, buf.getbuffer())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def training_curves(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Loss and accuracy per epoch, train and validation, from the metrics.jsonl rows."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train")
    val = [r for r in rows if r.get("val_acc") is not None]
    if val:
        ax_loss.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
        ax_acc.plot([r["epoch"] for r in val], [100 * r["val_acc"] for r in val], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def confusion_png(confusion: list[list[int]], classes: list[str], path: str | Path) -> None:
    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test set)")
    top = max(max(row) for row in confusion) or 1
    for i in range(n):
        for j in range(n):
            v = confusion[i][j]
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > top / 2 else "black",
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
