"""The ``predict`` command from end to end: the files (:mod:`.files`), the pipeline
(:mod:`.predict`), the output (:mod:`.results`), a progress bar and a closing summary.

Memory does not grow with the number of files: the files stream, results are written per
batch, and the only per-file state is the set of file identities (see :mod:`.files`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .files import Rejected, Shard, iter_files
from .inference import Predictor
from .predict import Prediction, predict_batches
from .results import open_output, opening, render, sidecar_path


@dataclass(frozen=True)
class Summary:
    files: int  # this run's input files (a resumed run: the ones it did)
    predicted: int
    rejected: int  # files that could not be used, and arguments that named nothing
    seconds: float
    skipped: int = 0  # files a resumed run found done

    def line(self) -> str:
        rate = self.files / self.seconds if self.seconds > 0 else 0.0
        resumed = f" (resumed: {self.skipped:,} were done before)" if self.skipped else ""
        return (
            f"predict: {self.files:,} files, {self.predicted:,} predicted, {self.rejected:,} "
            f"rejected, {rate:,.0f} img/s, {self.seconds:.1f} s{resumed}"
        )


def settings_record(
    model: Path, paths: list[str], fmt: str, top_k: int, shard: Shard | None, tta: bool = False
) -> dict:
    """What a resumed run must share with the partial one: the same model file (by size and
    modification time), inputs, format, top-k, shard and TTA."""
    st = model.stat()
    return {
        "model": str(model.resolve()),
        "model_size": st.st_size,
        "model_mtime_ns": st.st_mtime_ns,
        "paths": list(paths),
        "format": fmt,
        "top_k": top_k,
        "shard": str(shard) if shard else None,
        "tta": tta,
    }


def _skip_done(files: Iterator[Path], done: int, last_path: str | None) -> Iterator[Path]:
    """``files`` after the first ``done``, having checked that the last of those is the file
    the partial run did last (else the input changed and the partial output does not match
    it). Only the last skipped path is held, not all of them."""
    tail = deque(itertools.islice(files, done), maxlen=1)
    last = tail[0] if tail else None
    if done and (last is None or str(last) != last_path):
        now = "no such file" if last is None else repr(str(last))
        raise UserError(
            f"--resume: the input changed since the partial run (file {done:,} was "
            f"{last_path!r}, now {now}); start again without --resume"
        )
    return files


def _count_in_background(bar, paths: list[str], shard: Shard | None) -> None:
    """Give the progress bar its total (for the ETA) without holding up the first batch: the
    same walk, counted on a thread."""

    def count() -> None:
        bar.total = sum(1 for _ in iter_files(paths, lambda _: None, shard))
        bar.refresh()

    threading.Thread(target=count, daemon=True, name="count-files").start()


def resumable(output: str | None) -> bool:
    """Whether ``output`` has a partial run that ``--resume`` can continue."""
    return bool(output) and sidecar_path(Path(os.path.realpath(output))).is_file()


def run(
    predictor: Predictor,
    paths: list[str],
    *,
    top_k: int,
    fmt: str,
    output: str | None,
    workers: int,
    shard: Shard | None = None,
    resume: bool = False,
    tta: bool = False,
    progress: bool = False,
    on_rejected: Callable[[Rejected], None],
) -> Summary:
    """Predict every file ``paths`` name into ``output`` (stdout when None)."""
    from tqdm import tqdm

    start = time.perf_counter()
    missing: list[Rejected] = []

    def note_missing(r: Rejected) -> None:
        missing.append(r)
        on_rejected(r)

    record = settings_record(predictor.path, paths, fmt, top_k, shard, tta)
    out = open_output(output, record, resume)
    done = out.progress.files_done
    stream = iter_files(paths, note_missing, shard, output)
    files = _skip_done(stream, done, out.progress.last_path)
    bar = tqdm(unit="img", initial=done, disable=not progress, desc="predict", smoothing=0.1)
    if progress:
        _count_in_background(bar, paths, shard)
    predicted = rejected = 0
    batches = predict_batches(predictor, files, top_k, workers, tta)
    try:
        if out.progress.output_bytes == 0:
            out.write(opening(fmt), [], 0)
        with contextlib.closing(batches):  # on any exit the decoding processes stop at once
            for batch in batches:
                good = [r for r in batch if isinstance(r, Prediction)]
                for r in batch:
                    if isinstance(r, Rejected):
                        on_rejected(r)
                bad = len(batch) - len(good)
                out.write(render(good, fmt, out.progress), [r.path for r in batch], bad)
                predicted, rejected = predicted + len(good), rejected + bad
                bar.update(len(batch))
        out.finish(fmt)
    finally:
        bar.close()
        out.close()
    return Summary(
        predicted + rejected, predicted, rejected + len(missing), time.perf_counter() - start, done
    )
