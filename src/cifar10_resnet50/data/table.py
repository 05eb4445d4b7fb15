"""A CSV list of labelled images (``csv:FILE``), the usual Kaggle layout::

    path,label            (a header row; the columns are found by name)
    images/0001.jpg,cat   (paths relative to the CSV's folder, or absolute)
    images/0002.png,dog

Column names: the path is ``path``, ``file``, ``filename``, ``image`` or ``filepath``; the label
``label``, ``class``, ``category`` or ``target``; an optional ``split`` column says ``train``,
``val`` or ``test`` per row (without it a test split is held out, as for a folder). After
reading the rows everything is the folder source's (:func:`folder.load_scanned`): the same
decoding, cache, report of every row left out and why, splits and ``--strict``.

From Python, a pandas DataFrame with the same columns works too (``api.train(source=frame)``,
fastai's ``from_df``): :func:`from_frame` writes it as such a CSV, once per content.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import write_bytes
from ..images import printable
from . import folder
from .dataset import Arrays

PREFIX = "csv:"
PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
LABEL_COLUMNS = ("label", "class", "category", "target")
MAX_BYTES = 1 << 30  # a list of a million rows is ~50 MB; anything past 1 GiB is not one


def parse(source: str) -> Path | None:
    """The file of a ``csv:FILE`` source; None for any other source."""
    if not source.startswith(PREFIX):
        return None
    path = source[len(PREFIX) :]
    if not path:
        raise UserError("--data csv: needs a file, e.g. --data csv:labels.csv")
    return Path(path).expanduser()


def check(file: Path) -> None:
    if not file.is_file():
        raise UserError(f"--data csv:{file}: no such file (relative paths start at {Path.cwd()})")


def _column(header: list[str], names: tuple[str, ...], what: str, file: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise UserError(
        f"{file}: no {what} column in the header {header!r}; name it one of {', '.join(names)}"
    )


def _rows(file: Path) -> list[list[str]]:
    if file.stat().st_size > MAX_BYTES:
        raise UserError(f"{file}: larger than 1 GiB; not a list of images")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            return list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{file}: not a UTF-8 CSV file ({e})") from e


def scan(file: Path, root: Path) -> folder._Scan:
    """The rows as the folder source's scan: files per (split, label), and every row that
    cannot be used, with its line number."""
    rows = _rows(file)
    if not rows:
        raise UserError(f"{file}: empty; expected a header row (path,label) and one row per image")
    header = rows[0]
    path_col = _column(header, PATH_COLUMNS, "path", file)
    label_col = _column(header, LABEL_COLUMNS, "label", file)
    lowered = [h.strip().lower() for h in header]
    split_col = lowered.index("split") if "split" in lowered else None
    result = folder._Scan(split_layout=split_col is not None)
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines are skipped, as pandas' read_csv does
        problem = _row_problem(row, line, (path_col, label_col, split_col), root, seen)
        if problem is not None:
            result.problems.append(problem)
            continue
        name = str(Path(row[path_col].strip()))
        seen[name] = line
        split = row[split_col].strip().lower() if split_col is not None else "train"
        result.files.setdefault((split, row[label_col].strip()), []).append(name)
    return result


def _row_problem(
    row: list[str], line: int, cols: tuple[int, int, int | None], root: Path, seen: dict[str, int]
) -> folder.Problem | None:
    path_col, label_col, split_col = cols
    where = f"line {line}"
    if len(row) <= max(c for c in cols if c is not None):
        return folder.Problem(where, f"{len(row)} column(s); the header has more")
    path, label = row[path_col].strip(), row[label_col].strip()
    if not path or not label:
        return folder.Problem(where, "no path" if not path else "no label")
    split = row[split_col].strip().lower() if split_col is not None else "train"
    if split not in folder.SPLITS:
        return folder.Problem(where, f"split {printable(split)!r}: use train, val or test")
    name = str(Path(path))
    if name in seen:
        return folder.Problem(f"{name} ({where})", f"listed again (first on line {seen[name]})")
    if not (root / name).is_file():
        return folder.Problem(f"{name} ({where})", "no such file")
    return None


def load(
    file: Path,
    *,
    store_size: int,
    test_size: int | None = None,
    strict: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[Arrays, folder.Report]:
    """The listed images as :class:`Arrays` (``source`` = ``csv:<absolute path>``) and the
    report, exactly as a folder of them would be."""
    check(file)
    file = file.resolve()
    root = file.parent
    return folder.load_scanned(
        root, scan(file, root), PREFIX + str(file), store_size=store_size, test_size=test_size,
        strict=strict, workers=None, progress=progress, cache_dir=cache_dir,
    )  # fmt: skip


def from_frame(frame: Any, folder: Path) -> str:
    """A DataFrame of labelled images (the columns a CSV list has: path, label, optional
    split) as a ``csv:`` source: written to ``folder`` under a name taken from its content,
    image paths made absolute (relative ones start at the current directory), so that a
    resume, ``evaluate`` and the model's metadata find the same list later."""
    header = [str(c) for c in frame.columns]
    where = Path("the DataFrame")
    path_col = _column(header, PATH_COLUMNS, "path", where)
    _column(header, LABEL_COLUMNS, "label", where)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in frame.itertuples(index=False, name=None):
        cells = ["" if cell is None else str(cell) for cell in row]
        if cells[path_col].strip():
            cells[path_col] = os.path.abspath(os.path.expanduser(cells[path_col].strip()))
        writer.writerow(cells)
    data = text.getvalue().encode("utf-8")
    file = folder / f"frame-{hashlib.sha256(data).hexdigest()[:16]}.csv"
    if not file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(file, data)
    return PREFIX + str(file)
