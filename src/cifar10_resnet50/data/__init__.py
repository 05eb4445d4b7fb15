"""Where training data comes from. One module per source, each returning the same
in-memory :class:`Arrays` (uint8 ``[N,3,S,S]`` images, labels, class names, stored size):

* :mod:`.cifar10` — the default: download, verification, the official batches;
* :mod:`.folder` — ``folder:PATH``, the user's own images, decoded once on all cores;
* :mod:`.table` — ``csv:FILE``, the same from a list of (path, label) rows;

and what every source shares: :mod:`.dataset` (``Arrays``, seeded stratified splits),
:mod:`.cache` (the uint8 tensor cache) and :mod:`.augment` (batched on-device crop, flip,
mixup and CutMix, and the epoch's batches).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import cifar10, folder, table
from .cache import user_cache_dir
from .dataset import Arrays, content_digest, stratified_split

__all__ = [
    "Arrays",
    "check",
    "content_digest",
    "for_model",
    "label",
    "load",
    "stratified_split",
    "user_cache_dir",
]

log = logging.getLogger(__name__)


def check(source: str, data_dir: str | None) -> None:
    """What can be checked before anything is built: the source's spelling and its folder."""
    root = folder.parse(source)
    if root is not None:
        folder.check(root)
        return
    listed = table.parse(source)
    if listed is not None:
        table.check(listed)
        return
    if source != "cifar10":
        raise UserError(
            f"--data {source!r}: use cifar10, folder:PATH (a folder of images) or csv:FILE "
            "(rows of path,label)"
        )
    cifar10.check_download_target(cifar10.resolve_data_dir(data_dir), explicit=data_dir is not None)


def load(
    source: str,
    *,
    data_dir: str | None = None,
    download: bool = True,
    store_size: int | None = None,
    test_size: int | None = None,
    strict: bool = False,
    progress: bool = True,
) -> Arrays:
    """The dataset ``source`` names (``cifar10``, ``folder:PATH`` or ``csv:FILE``), as uint8
    tensors; the report of one's own images (classes, counts, every file left out and why)
    is logged."""
    root, listed = folder.parse(source), table.parse(source)
    if root is None and listed is None:
        if store_size not in (None, cifar10.IMAGE_SIZE) or test_size is not None:
            raise UserError(
                "--store-size and --test-size are for your own images (folder:PATH, csv:FILE)"
            )
        path = cifar10.resolve_data_dir(data_dir)
        if not cifar10.is_present(path) and download:
            cifar10.download(path, progress=progress)
        return cifar10.load(path)
    if store_size is None:
        raise UserError(f"--data {source} needs a stored image size (--store-size)")
    loader = (
        functools.partial(folder.load, root)
        if root is not None
        else functools.partial(table.load, listed)
    )
    arrays, report = loader(
        store_size=store_size, test_size=test_size, strict=strict, progress=progress
    )
    log.info("%s", report.summary())
    for line in report.lines():
        log.warning("left out %s", line)
    return arrays


def for_model(
    meta: dict[str, Any],
    source: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> Arrays:
    """The data a model (its validated ``meta``) was trained on — the same test split — or
    ``source`` when given; refused when its classes or image size are not the model's."""
    recorded = meta.get("data") or {"source": "cifar10"}  # older checkpoints: CIFAR-10
    source = source or recorded["source"]
    is_folder = source != "cifar10"  # one's own images, stored at the model's input size
    arrays = load(
        source,
        data_dir=data_dir,
        download=False,
        store_size=meta["input_size"] if is_folder else None,
        test_size=recorded.get("test_size") if source == recorded["source"] else None,
        progress=progress,
    )
    if list(arrays.classes) != list(meta["classes"]):
        raise UserError(
            f"{label(source)} has the classes {', '.join(arrays.classes)}; the model was "
            f"trained on {', '.join(meta['classes'])}. Pass --data with the model's data"
        )
    if arrays.image_size != meta["input_size"]:
        raise UserError(
            f"{label(source)} holds {arrays.image_size} px images; the model takes "
            f"{meta['input_size']} px. Pass --data with the model's data"
        )
    return arrays


def label(source: str) -> str:
    """A short name for messages: "CIFAR-10", the folder's or the list's name."""
    root, listed = folder.parse(source), table.parse(source)
    if root is not None:
        return f"folder {Path(root).name or root}"
    return "CIFAR-10" if listed is None else f"list {listed.name}"
