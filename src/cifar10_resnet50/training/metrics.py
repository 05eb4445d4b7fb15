"""``metrics.jsonl``: one JSON row per epoch, appended through ``fileio`` as each epoch ends;
the one place that reads it back (a torn last line from a kill is dropped here, and only
here) and that cuts it back to the epochs a resumed run keeps."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import append_line, write_bytes

log = logging.getLogger(__name__)

NAME = "metrics.jsonl"


def append(out: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row (the main process only calls this)."""
    append_line(out / NAME, json.dumps(row))


def read(path: Path) -> list[dict[str, Any]]:
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


def truncate(out: Path, epochs_done: int) -> None:
    """Drop rows of epochs that the resumed run will redo (written after the last save)."""
    path = out / NAME
    if path.exists():
        rows = [r for r in read(path) if r["epoch"] <= epochs_done]
        write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))


def curves_title(out: Path, rows: list[dict[str, Any]], report: Any) -> str:
    """Run name, best epoch (by validation accuracy) and the final test accuracy, if known."""
    parts = [out.name]
    val = [r for r in rows if r.get("val_acc") is not None]
    if val:
        best = max(val, key=lambda r: r["val_acc"])
        parts.append(f"best epoch {best['epoch']} (val {100 * best['val_acc']:.2f}%)")
    if report is not None:
        parts.append(f"test {100 * report.metrics['accuracy']:.2f}%")
    return " — ".join(parts)
