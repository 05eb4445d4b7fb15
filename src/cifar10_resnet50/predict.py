"""The ``predict`` command: top-k classes for the user's image files.

Paths may be files, folders (searched recursively for files with an image extension Pillow
knows) or glob patterns. Images are decoded and predicted in batches; a file that cannot be
used is reported and skipped, and the rest are still predicted.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import images as images_lib
from .inference import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def expand(paths: list[str]) -> tuple[list[Path], list[Rejected]]:
    """Files to predict, in a stable order, and the arguments that named nothing."""
    found: list[Path] = []
    missing: list[Rejected] = []
    extensions = None
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            extensions = extensions or _image_extensions()
            found.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            )
        elif p.is_file():
            found.append(p)
        elif glob.has_magic(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                missing.append(Rejected(arg, "no files match this pattern"))
            found.extend(matches)
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
                decoded.append((i, images_lib.read_file(path).pixels))
            except images_lib.ImageError as e:
                results[i] = Rejected(str(path), str(e))
        if decoded:
            probs = predictor.probabilities(np.stack([px for _, px in decoded]))
            for (i, _), top in zip(decoded, predictor.top_k(probs, top_k), strict=True):
                results[i] = Prediction(str(chunk[i]), top)
        bar.update(len(chunk))
        yield from (r for r in results if r is not None)
    bar.close()


def render(predictions: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        rows = [
            {
                "path": p.path,
                "top": [{"label": lab, "probability": round(pr, 6)} for lab, pr in p.top],
            }
            for p in predictions
        ]
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "rank", "label", "probability"])
        for p in predictions:
            for rank, (lab, pr) in enumerate(p.top, 1):
                writer.writerow([p.path, rank, lab, f"{pr:.6f}"])
        return buf.getvalue()
    if not predictions:
        return ""
    width = min(max(len(p.path) for p in predictions), 60)
    k = len(predictions[0].top)
    header = f"{'file':<{width}}  " + "  ".join(f"{'top ' + str(r):<20}" for r in range(1, k + 1))
    lines = [header]
    for p in predictions:
        name = p.path if len(p.path) <= width else "…" + p.path[-(width - 1) :]
        cells = "  ".join(f"{lab + f' {100 * pr:.1f}%':<20}" for lab, pr in p.top)
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines) + "\n"
