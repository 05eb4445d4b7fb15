"""The ``predict`` command: top-k classes for the user's image files.

Paths may be files, folders (searched recursively for files with an image extension Pillow
knows) or glob patterns. Images are decoded and predicted in batches; a file that cannot be
used is reported and skipped, and the rest are still predicted.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import images as images_lib
from .inference import Predictor, top_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]
    width: int | None = None  # the image's size after EXIF orientation
    height: int | None = None


# Folders nest at most this deep below each argument: far past any photo library, and a
# bound on the walk even where links make the tree infinite.
MAX_DEPTH = 32


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _walk(root: Path, max_depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Every file under ``root``, following links, visiting each real folder once.

    Folders are remembered by (device, inode), so links back to an ancestor (or two links to
    one folder) cannot loop; ``os.walk`` with ``followlinks`` alone would never end on them.
    """
    seen: set[tuple[int, int]] = set()
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    if depth < max_depth:
                        stack.append((path, depth + 1))
                elif entry.is_file():
                    yield path
            except OSError:
                continue


def _split_glob(pattern: str) -> tuple[Path, list[str]]:
    """``a/b/**/*.png`` → (Path("a/b"), ["**", "*.png"]): the literal prefix and the rest."""
    parts = Path(pattern).parts
    literal = 0
    while literal < len(parts) - 1 and not glob.has_magic(parts[literal]):
        literal += 1
    base = Path(*parts[:literal]) if literal else Path(".")
    return base, list(parts[literal:])


def _match(parts: tuple[str, ...], pattern: list[str]) -> bool:
    """Glob semantics per path component; ``**`` matches zero or more folders. Names starting
    with a dot match only patterns that start with one, as in the shell and ``glob``."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for i in range(len(parts) + 1):
            if i > 0 and parts[i - 1].startswith("."):
                return False  # ** does not enter hidden folders
            if _match(parts[i:], rest):
                return True
        return False
    if not parts:
        return False
    name = parts[0]
    if name.startswith(".") and not head.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, head) and _match(parts[1:], rest)


def _glob(pattern: str) -> list[Path]:
    base, rest = _split_glob(pattern)
    depth = MAX_DEPTH if "**" in rest else len(rest) - 1
    return sorted(p for p in _walk(base, depth) if _match(p.relative_to(base).parts, rest))


def expand(paths: list[str]) -> tuple[list[Path], list[Rejected]]:
    """Files to predict, in a stable order, each real file once, and the arguments that
    named nothing. Folders are searched recursively for extensions Pillow knows; glob
    patterns (``**`` too) are expanded here, with the same loop-proof walk."""
    found: list[Path] = []
    missing: list[Rejected] = []
    seen: set[tuple[int, int]] = set()
    extensions = None

    def add(candidates: list[Path]) -> None:
        for f in candidates:
            try:
                st = f.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                found.append(f)

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            extensions = extensions or _image_extensions()
            add(sorted(f for f in _walk(p) if f.suffix.lower() in extensions))
        elif p.is_file():
            add([p])
        elif glob.has_magic(arg):
            matches = _glob(arg)
            if not matches:
                missing.append(Rejected(arg, "no files match this pattern"))
            add(matches)
        else:
            missing.append(Rejected(arg, "no such file or folder"))
    return found, missing


def predict_files(
    predictor: Predictor, files: list[Path], top_k: int, progress: bool = False
) -> Iterator[Prediction | Rejected]:
    """Decode and predict in batches of ``predictor.batch_size``; yields in input order."""
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="img", disable=not progress, desc="predict")
    for start in range(0, len(files), predictor.batch_size):
        chunk = files[start : start + predictor.batch_size]
        decoded: list[tuple[int, np.ndarray]] = []
        results: list[Prediction | Rejected | None] = [None] * len(chunk)
        for i, path in enumerate(chunk):
            try:
                decoded.append((i, images_lib.read_file(path, size=predictor.input_size)))
            except images_lib.ImageError as e:
                results[i] = Rejected(str(path), str(e))
        if decoded:
            probs = predictor.probabilities(np.stack([d.pixels for _, d in decoded]))
            for (i, d), top in zip(decoded, predictor.top_k(probs, top_k), strict=True):
                results[i] = Prediction(str(chunk[i]), top, *d.original_size)
        bar.update(len(chunk))
        yield from (r for r in results if r is not None)
    bar.close()


def render(predictions: list[Prediction], fmt: str) -> str:
    """Results as text. Names: JSON and CSV keep them exactly (a name that is not UTF-8 keeps
    its bytes as Python's surrogate escapes: ``\udcff`` in JSON; :func:`encode` writes the
    original bytes back in CSV); the table escapes control characters and those bytes
    (``\x1b``, ``\n``, ``\xff``) so a hostile name cannot drive the terminal or split a row."""
    if fmt == "json":
        rows = [
            {
                "path": p.path,
                "width": p.width,
                "height": p.height,
                "top": top_json(p.top),
            }
            for p in predictions
        ]
        # ensure_ascii: lone surrogates become \udcXX escapes, valid JSON text on any stream.
        return json.dumps(rows, indent=2, ensure_ascii=True) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "width", "height", "rank", "label", "probability"])
        for p in predictions:
            for rank, (lab, pr) in enumerate(p.top, 1):
                writer.writerow([p.path, p.width, p.height, rank, lab, f"{pr:.6f}"])
        return buf.getvalue()
    if not predictions:
        return ""
    names = [images_lib.printable(p.path) for p in predictions]
    width = min(max(len(n) for n in names), 60)
    k = len(predictions[0].top)
    header = f"{'file':<{width}}  " + "  ".join(f"{'top ' + str(r):<20}" for r in range(1, k + 1))
    lines = [header]
    for name, p in zip(names, predictions, strict=True):
        name = name if len(name) <= width else "…" + name[-(width - 1) :]
        cells = "  ".join(f"{lab + f' {100 * pr:.1f}%':<20}" for lab, pr in p.top)
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines) + "\n"


def encode(text: str) -> bytes:
    """Rendered text → bytes for a file or stdout: UTF-8, with the surrogate escapes of
    non-UTF-8 file names turned back into their original bytes (so CSV names are exact)."""
    return text.encode("utf-8", "surrogateescape")
