"""Files we write: atomic and crash-safe, never destroying what we were not asked to touch.

Every file the project writes goes through here:

* :func:`atomic_open` / :func:`write_bytes` / :func:`save_torch` write a regular file through a
  temporary file beside it (fsync, rename): a crash leaves the old file or the new one, never a
  torn one. A symlink is written through to its target (the link stays a link). A FIFO, a
  character device or ``-`` (stdout) is written directly: renaming over ``/dev/null`` would
  replace the device node with a plain file. A FIFO or device is opened without blocking, so
  a FIFO that nobody reads (or a socket) is a one-line error at once, never a hang.
* A write that fails (full disk, I/O error, permissions) is one :class:`WriteError` naming the
  path (and the space needed when known); the temporary file is removed and the previous file
  is untouched.
* Temporary names carry the writer's host and PID (``.NAME.HOST-PID.RANDOM.tmp``), so a later
  run can tell a temporary file whose writer was killed (SIGKILL, power cut) from one still
  being written, and :func:`remove_stale_temps` deletes only the former.
* :func:`check_not_input` refuses an output that is the same file (device and inode, through
  links) as one of the command's inputs: ``export CKPT --out CKPT`` must not eat the checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError

log = logging.getLogger(__name__)

STDOUT = "-"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
# .NAME.HOST-PID.RANDOM.tmp: mkstemp/mkdtemp add RANDOM (8 chars of [a-z0-9_]).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
# A temporary file from another machine (shared file system) is only judged stale by age.
_FOREIGN_STALE_S = 24 * 3600


class WriteError(UserError):
    """Writing an output failed; the message names the path and what to do."""


# --------------------------------------------------------------------------- temporary names


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}."


def mkstemp_beside(path: Path) -> tuple[int, Path]:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    return fd, Path(tmp)


@contextlib.contextmanager
def temp_dir_beside(path: Path) -> Iterator[Path]:
    """A scratch folder next to ``path`` (same file system), removed on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _writer_gone(host: str, pid: int, mtime: float) -> bool:
    if host != _HOST:
        return time.time() - mtime > _FOREIGN_STALE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete our temporary files and folders in ``folder`` whose writer is gone; one log line.

    Called when a run, the tensor cache or an export starts, so a SIGKILL during a save (which
    no ``finally`` can catch) costs disk only until the next run.
    """
    folder = Path(folder)
    removed, size = [], 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not _writer_gone(m["host"], int(m["pid"]), st.st_mtime):
                continue
            if entry.is_dir(follow_symlinks=False):
                size += sum(f.stat().st_size for f in Path(entry.path).rglob("*") if f.is_file())
                shutil.rmtree(entry.path)
            else:
                size += st.st_size
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # removed meanwhile, or not ours to remove: leave it
            continue
    if removed:
        log.warning(
            "removed %d stale temporary file(s) left by a killed writer in %s (%.1f MB)",
            len(removed),
            folder,
            size / 1e6,
        )
    return removed


# --------------------------------------------------------------------------- output targets


def is_special(path: Path) -> bool:
    """A FIFO, character device or socket: written in place, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_not_input(output: str | Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an ``output`` that is the same file as any input (device and inode, via links)."""
    if str(output) == STDOUT:
        return
    try:
        out = os.stat(output)
    except OSError:
        return  # does not exist yet: cannot be an input
    if not stat.S_ISREG(out.st_mode):
        return
    for item in inputs:
        with contextlib.suppress(OSError):
            st = os.stat(item)
            if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
                raise UserError(
                    f"{flag} {output} is the same file as the input {item}; writing it would "
                    "destroy the input. Choose another output path."
                )


def prepare_output(path: str | Path, inputs: Iterable[str | Path] = (), flag: str = "--out"):
    """Check an output path before any work: not an input, not a folder, its folder writable."""
    if str(path) == STDOUT:
        return
    path = Path(path)
    check_not_input(path, inputs, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not is_special(path):
        ensure_writable_dir(Path(os.path.realpath(path)).parent)


def _describe_failure(path: Path, e: OSError, size: int | None, atomic: bool = True) -> str:
    reason = e.strerror or str(e)
    text = f"cannot write {path}: {reason}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(path.parent).free
            need = f"needs {size / 1e6:,.1f} MB, " if size else ""
            text += f" ({need}{free / 1e6:,.1f} MB free there); free some space or write elsewhere"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += "; check the permissions, or choose another path"
    elif e.errno == errno.ENXIO:  # O_NONBLOCK open of a FIFO without a reader, or a socket
        return (
            f"cannot write {path}: it is a FIFO that no process is reading, or a socket; "
            "start the reader first, or write to a regular file"
        )
    else:
        text += "; check the device and the path"
    return text + (" (any previous file there is unchanged)" if atomic else "")


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "wb", *, size: int | None = None
) -> Iterator[IO[Any]]:
    """Write ``path`` all or nothing; see the module docstring for links and special files.

    ``size`` (bytes, when known) makes a full-disk error say how much space was needed.
    """
    path = Path(path)
    if str(path) == STDOUT:
        stream = sys.stdout.buffer if "b" in mode else sys.stdout
        yield stream
        stream.flush()
        return
    if is_special(path):
        try:
            with open_special(path, mode) as f:
                yield f
        except OSError as e:
            raise WriteError(_describe_failure(path, e, size)) from None
        return
    target = Path(os.path.realpath(path))  # a symlink is written through, not replaced
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp_beside(target)
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise WriteError(_describe_failure(path, e, size)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    # fsync the directory so the rename itself survives a power cut.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def open_special(path: Path, mode: str = "wb") -> IO[Any]:
    """Open a FIFO or device for writing. Non-blocking, so a FIFO without a reader fails now
    (ENXIO) instead of blocking in open() forever; then blocking again, so writes wait for a
    slow reader."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def write_error(path: Path, e: OSError) -> WriteError:
    """A failed write of ``path`` as the one-line error users get for every write."""
    return WriteError(_describe_failure(path, e, None, atomic=False))


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_open(path, "wb", size=len(data)) as f:
        f.write(data)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_open`.

    Serialised in memory first: torch's zip writer turns a failed write into an internal
    "enforce fail … unexpected pos" RuntimeError, whereas a plain write of bytes fails with
    the OS's own error (ENOSPC, EIO), and the size needed is known for the message.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


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


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log of ours (``metrics.jsonl``). Not atomic: a kill can tear the
    last line, which its reader drops. A FIFO or device there is refused, never opened."""
    path = Path(path)
    if is_special(path):
        raise WriteError(f"cannot append to {path}: it is not a regular file; remove it")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError as e:
        raise WriteError(_describe_failure(path, e, None)) from None


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    write_bytes(path, text.encode("utf-8"))


def file_digest(path: str | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
