"""The one-file uint8 tensor cache every data source uses, in the user cache.

Not in the data folder, which may be read-only (CI's ``../shared``). A cache file is keyed by
its source's fingerprint (file names, sizes, mtimes), carries a sha256 of its content that is
checked on every load, and only the most recently used files are kept, so the cache cannot
fill a disk. A damaged cache is only a cache: it is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import UserError, first_line
from ..fileio import remove_stale_temps, save_torch
from .dataset import digest

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "CIFAR10_RESNET50_CACHE"
T = TypeVar("T")


def user_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar10-resnet50"


def tensor_dir(cache_dir: str | Path | None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "tensors"
    remove_stale_temps(folder)
    return folder


def read(
    path: Path, version: int, fingerprint: Any, build: Callable[[dict[str, Any]], T]
) -> T | None:
    """What ``build`` makes of the cached dict if ``path`` is ours, current and intact; else
    None (with a warning when the file exists but is damaged). ``build`` checks the dict and
    raises on anything a fresh load would refuse. ``fingerprint=None`` accepts any source
    state (an intact earlier cache, to reuse what did not change)."""
    if path.exists() and not path.is_file():  # opening a FIFO would block until a writer came
        raise UserError(
            f"the tensor cache {path} is not a regular file (a FIFO, socket, device or folder); "
            f"remove it, or set ${ENV_CACHE_DIR} to another folder"
        )
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob.get("version") != version:
            return None  # an older release wrote it: rebuild quietly
        if fingerprint is not None and blob.get("fingerprint") != fingerprint:
            return None  # the source changed: rebuild quietly
        if digest([blob[k] for k in blob["tensors"]]) != blob.get("sha256"):
            raise UserError("content checksum mismatch")
        result = build(blob)
    except Exception as e:  # a damaged cache is only a cache: rebuild it, never use it
        log.warning("tensor cache %s is damaged (%s); rebuilding it", path, first_line(e))
        return None
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(path)  # mark as recently used for prune
    return result


def write(
    path: Path,
    version: int,
    fingerprint: Any,
    tensors: dict[str, torch.Tensor],
    extra: dict[str, Any],
) -> None:
    """Store ``tensors`` (with a sha256 over them) and plain ``extra`` facts at ``path``; a
    failure only warns."""
    blob = {
        "version": version,
        "fingerprint": fingerprint,
        "tensors": list(tensors),
        "sha256": digest(tensors.values()),
        **tensors,
        **extra,
    }
    try:
        save_torch(blob, path)
    except UserError as e:  # no cache is slower, not wrong
        log.warning("could not write the tensor cache: %s", e)


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used files matching ``pattern``."""
    used = []
    for entry in folder.glob(pattern):
        try:
            used.append((entry.stat().st_mtime, entry))
        except OSError:  # removed meanwhile by another process: nothing to prune
            continue
    for _, stale in sorted(used, reverse=True)[keep:]:
        try:
            stale.unlink()
            log.info("removed least recently used tensor cache %s", stale)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove the tensor cache %s: %s", stale, e)
