"""Small file helpers shared by data, checkpoint and evaluation code."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash or kill at any moment leaves either the old file or the new one, never a torn one
    (rename is atomic on POSIX within one file system). The temporary file is removed if the
    writer raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # fsync the directory so the rename itself survives a power cut.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file; else a UserError that says what to pass instead."""
    path = Path(path)
    if path.is_dir():
        inside = path / "best.pt"
        hint = f", for example {inside}" if inside.is_file() else ""
        raise UserError(f"{path} is a folder; pass the {what} file inside it{hint}")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove it takes a file, before any long computation.

    A bad output path then fails in the first second (OSError naming the path), not after
    minutes of work whose result would be lost.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder should be; mkdir's message misleads
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", e.filename) from None
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # name the folder, not the random probe file
        raise type(e)(e.errno, e.strerror, str(folder)) from None
    return folder


def write_json(path: str | Path, data: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def file_digest(path: str | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
