"""Where ``predict``'s results go: four formats written batch by batch, and an output file
that a killed run can resume.

Formats (``--format``): ``table`` (for people), ``csv`` (one row per file and rank), ``json``
(one array, byte for byte what ``json.dumps(rows, indent=2)`` gives) and ``jsonl`` (one object
per line: the format for millions of files). Names: JSON and CSV keep them exactly (a name that
is not UTF-8 keeps its bytes as Python's surrogate escapes: ``\\udcff`` in JSON; :func:`encode`
writes the original bytes back in CSV); the table escapes control characters and those bytes
(``\\x1b``, ``\\n``, ``\\xff``) so a hostile name cannot drive the terminal or split a row.

An ``--output`` file is written as ``FILE.partial`` and renamed to ``FILE`` only when the run
completes. Beside it, ``FILE.partial.json`` records what the partial holds: the input files
done, the bytes of output that cover them, and the settings. It is rewritten (atomically,
after an fsync of the output) at most every :data:`COMMIT_EVERY_S` seconds, so a run killed at
any moment resumes (``--resume``) by cutting the partial back to the recorded size (a torn
last line disappears with it) and skipping the files done: the result is byte for byte the
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import fileio
from ..errors import UserError
from ..images import printable
from .inference import top_json
from .predict import Prediction

COMMIT_EVERY_S = 1.0
TABLE_MAX_NAME = 60  # characters of a file name in the table; longer ones keep their end


@dataclass
class Progress:
    """What an output holds so far; the sidecar file's content."""

    settings: dict[str, Any]  # what must match for --resume
    files_done: int = 0  # input files consumed (predicted or rejected)
    predicted: int = 0
    rejected: int = 0
    output_bytes: int = 0
    last_path: str | None = None  # the last input file done: checks the input is unchanged
    table_width: int | None = None  # fixed by the first batch, kept on resume
    top_k_shown: int | None = None


def encode(text: str) -> bytes:
    """Rendered text → bytes for a file or stdout: UTF-8, with the surrogate escapes of
    non-UTF-8 file names turned back into their original bytes (so CSV names are exact)."""
    return text.encode("utf-8", "surrogateescape")


def _row(p: Prediction) -> dict[str, Any]:
    return {"path": p.path, "width": p.width, "height": p.height, "top": top_json(p.top)}


def render(predictions: list[Prediction], fmt: str, progress: Progress) -> str:
    """The text for one batch of predictions, following what ``progress`` says was written
    before (JSON's commas, the table's header and width); updates ``progress``."""
    first = progress.predicted == 0
    progress.predicted += len(predictions)
    if fmt == "jsonl":
        # ensure_ascii: lone surrogates become \udcXX escapes, valid JSON text on any stream.
        return "".join(json.dumps(_row(p), ensure_ascii=True) + "\n" for p in predictions)
    if fmt == "json":
        parts = [
            textwrap.indent(json.dumps(_row(p), indent=2, ensure_ascii=True), "  ")
            for p in predictions
        ]
        return ("[\n" if first else ",\n") * bool(parts) + ",\n".join(parts)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        for p in predictions:
            for rank, (lab, pr) in enumerate(p.top, 1):
                writer.writerow([p.path, p.width, p.height, rank, lab, f"{pr:.6f}"])
        return buf.getvalue()
    return _table(predictions, progress, first)


def _table(predictions: list[Prediction], progress: Progress, first: bool) -> str:
    if not predictions:
        return ""
    names = [printable(p.path) for p in predictions]
    lines = []
    if first:  # the first batch fixes the column width (the table streams)
        progress.table_width = max(4, min(max(len(n) for n in names), TABLE_MAX_NAME))
        progress.top_k_shown = len(predictions[0].top)
        heads = "  ".join(f"{'top ' + str(r):<20}" for r in range(1, progress.top_k_shown + 1))
        lines.append(f"{'file':<{progress.table_width}}  {heads}")
    width = progress.table_width or TABLE_MAX_NAME
    for name, p in zip(names, predictions, strict=True):
        name = name if len(name) <= width else "…" + name[-(width - 1) :]
        cells = "  ".join(f"{lab + f' {100 * pr:.1f}%':<20}" for lab, pr in p.top)
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines) + "\n"


def opening(fmt: str) -> str:
    """What a new output starts with."""
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerow(["path", "width", "height", "rank", "label", "probability"])
        return buf.getvalue()
    return ""


def closing(fmt: str, progress: Progress) -> str:
    if fmt == "json":
        return "\n]\n" if progress.predicted else "[]\n"
    return ""


@dataclass
class Output:
    """An open destination: stdout, a FIFO or device (written directly, not resumable), or a
    regular file written through ``FILE.partial``."""

    stream: IO[bytes]
    progress: Progress
    path: Path | None = None  # the final name of a regular file
    last_commit: float = field(default_factory=time.monotonic)

    @property
    def partial(self) -> Path:
        assert self.path is not None
        return partial_path(self.path)

    def write(self, text: str, files: list[str], rejected: int) -> None:
        """One batch: its text, and the input files it covers (done once written)."""
        data = encode(text)
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError as e:
            raise fileio.write_error(self.path or Path("the output"), e) from None
        p = self.progress
        p.files_done += len(files)
        p.rejected += rejected
        p.output_bytes += len(data)
        p.last_path = files[-1] if files else p.last_path
        if self.path is not None and time.monotonic() - self.last_commit >= COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        """Make what was written durable, then say so in the sidecar (that order: the sidecar
        never claims bytes a power cut could lose)."""
        os.fsync(self.stream.fileno())
        fileio.write_json(sidecar_path(self.path), asdict(self.progress))
        self.last_commit = time.monotonic()

    def finish(self, fmt: str) -> None:
        """The closing text, then the rename. The closing is never committed to the record: a
        kill before the rename resumes to a partial without it, and adds it once."""
        try:
            self.stream.write(encode(closing(fmt, self.progress)))
            self.stream.flush()
        except OSError as e:
            raise fileio.write_error(self.path or Path("the output"), e) from None
        if self.path is None:
            return
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.partial, self.path)
        sidecar_path(self.path).unlink(missing_ok=True)

    def close(self) -> None:
        """On an error or interrupt: commit what is complete, so --resume can go on."""
        if self.path is not None and not self.stream.closed:
            try:
                with contextlib.suppress(OSError, UserError):  # best effort: already failing
                    self.commit()
            finally:
                self.stream.close()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.json")


def open_output(path: str | None, settings: dict[str, Any], resume: bool) -> Output:
    """The destination for a run: stdout when ``path`` is None or ``-``; a FIFO or device as
    it is; a regular file through its partial, continued when ``resume`` finds one."""
    import sys

    if path is None or path == fileio.STDOUT:
        if resume:
            raise UserError("--resume continues an --output file; give the same --output")
        return Output(sys.stdout.buffer, Progress(settings))
    target = Path(os.path.realpath(path))
    if fileio.is_special(Path(path)):
        if resume:
            raise UserError(f"--resume needs a regular --output file; {path} is a FIFO or device")
        try:
            return Output(fileio.open_special(Path(path)), Progress(settings))
        except OSError as e:
            raise fileio.write_error(Path(path), e) from None
    sidecar = sidecar_path(target)
    if sidecar.is_file() and not resume:
        raise UserError(
            f"{partial_path(target)} holds the results of an unfinished run: add --resume to "
            f"continue it, or delete it and {sidecar} to start again"
        )
    if resume and sidecar.is_file():
        progress = _read_progress(sidecar, settings)
        stream = _reopen(partial_path(target), progress.output_bytes)
        return Output(stream, progress, target)
    try:
        stream = open(partial_path(target), "wb")  # noqa: SIM115 (Output owns and closes it)
    except OSError as e:
        raise fileio.write_error(partial_path(target), e) from None
    out = Output(stream, Progress(settings), target)
    out.commit()  # from now on an interrupted run can be resumed
    return out


def _read_progress(sidecar: Path, settings: dict[str, Any]) -> Progress:
    try:
        progress = Progress(**json.loads(sidecar.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"{sidecar}: cannot read the partial run's record ({e}); delete it and its "
            ".partial file to start again"
        ) from None
    keys = settings.keys() | progress.settings.keys()
    changed = sorted(k for k in keys if settings.get(k) != progress.settings.get(k))
    if changed:
        raise UserError(
            f"--resume: the partial output was made with other settings ({', '.join(changed)}); "
            f"run the same command again, or delete {sidecar} to start again"
        )
    return progress


def _reopen(partial: Path, size: int) -> IO[bytes]:
    """The partial cut back to what the record covers: anything after it (a torn line, a
    batch written but not committed) goes, and is predicted again."""
    try:
        stream = open(partial, "r+b")  # noqa: SIM115 (Output owns and closes it)
    except OSError as e:
        raise UserError(f"--resume: cannot reopen {partial} ({e.strerror or e})") from None
    if os.fstat(stream.fileno()).st_size < size:
        stream.close()
        raise UserError(f"{partial} is shorter than its record says; delete it to start again")
    stream.truncate(size)
    stream.seek(size)
    return stream
