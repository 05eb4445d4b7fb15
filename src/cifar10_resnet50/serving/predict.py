"""The ``predict`` command's pipeline: files → decoded batches → the model → results, in input
order.

Decoding runs in worker processes (:mod:`..decode_pool`), a bounded number of batches ahead
of the model, so decoding and inference overlap and several cores decode: one core decodes
256 px JPEGs at ~1,200 img/s, far below what the model alone does on a GPU (issue 20; figures
in BENCHMARKS.md).

Where the files come from is :mod:`.files`; where the results go (formats, resume) is
:mod:`.results`; the command itself is :func:`run`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import images as images_lib
from ..decode_pool import decode_in_order, usable_cores
from .files import Rejected
from .inference import Predictor


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]
    width: int | None = None  # the image's size after EXIF orientation
    height: int | None = None


Result = Prediction | Rejected


def default_workers(model_threads: int | None, on_gpu: bool) -> int:
    """Decoding processes when ``--workers`` is not given: the cores the model leaves free.
    A GPU model needs one core to feed it; a CPU model without ``--threads`` uses every core,
    and then 1 process decodes beside it (so decoding still overlaps the model)."""
    n = usable_cores()
    if model_threads:
        return max(1, n - model_threads)
    return max(1, n - 1) if on_gpu else 1


def _chunks(files: Iterable[Path], size: int) -> Iterator[list[Path]]:
    it = iter(files)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def decoded_batches(
    files: Iterable[Path], size: int, batch_size: int, workers: int
) -> Iterator[tuple[list[Path], np.ndarray, list[tuple[int, int]], list[str]]]:
    """(paths, uint8 ``[n,size,size,3]``, (width, height) per file, "" or the error per file)
    for each batch of ``batch_size`` files, in input order, decoded by ``workers`` processes
    ahead of the consumer (:func:`decode_pool.decode_in_order`; 0: in this process)."""
    batches: deque[list[Path]] = deque()  # the paths of the batches submitted, in order

    def chunks() -> Iterator[tuple[list[str], None]]:
        for chunk in _chunks(files, batch_size):
            batches.append(chunk)
            yield [str(p) for p in chunk], None

    for decoded in decode_in_order(chunks(), size, workers):
        yield batches.popleft(), *decoded


def predict_batches(
    predictor: Predictor, files: Iterable[Path], top_k: int, workers: int = 0, tta: bool = False
) -> Iterator[list[Result]]:
    """One list of results per batch of ``predictor.batch_size`` files, in input order: a
    :class:`Prediction` per file that decoded, a :class:`Rejected` (one line why) per file
    that did not."""
    for paths, pixels, sizes, errors in decoded_batches(
        files, predictor.input_size, predictor.batch_size, workers
    ):
        good = [i for i, e in enumerate(errors) if not e]
        results: list[Result] = [
            Rejected(str(p), images_lib.without_name(e, str(p)))
            for p, e in zip(paths, errors, strict=True)
        ]
        if good:
            probs = predictor.probabilities(pixels[good], tta)
            for i, top in zip(good, predictor.top_k(probs, top_k), strict=True):
                results[i] = Prediction(str(paths[i]), top, *sizes[i])
        yield results


def predict_files(
    predictor: Predictor, files: Iterable[Path], top_k: int, workers: int = 0, tta: bool = False
) -> Iterator[Result]:
    """:func:`predict_batches`, one result at a time."""
    for batch in predict_batches(predictor, files, top_k, workers, tta):
        yield from batch
