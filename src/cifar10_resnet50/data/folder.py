"""A folder of the user's own images, as uint8 tensors like CIFAR-10's.

Two layouts (torchvision's ``ImageFolder`` shape)::

    PATH/<class>/**/<image>                  one folder per class; a test split is held out
    PATH/train/<class>/**, PATH/test/<class>/**  [, PATH/val/<class>/**]

Class names are the training class folders' names, sorted. Every other file is decoded once
by the project's safe decoder (:func:`images.decode_many`: EXIF orientation, modes, 16-bit,
byte/pixel/time limits) in worker processes on all cores, brought to ``store_size`` px by the
same policy predictions use (centred square, Lanczos), and kept in the tensor cache, keyed by
every file's relative path, size and mtime plus the store size: adding, removing or changing a
file rebuilds it.

Files that cannot be used are listed with the reason (:class:`Report`) and left out, unless
``strict``. A class needs at least two usable images (one to train on, one to hold out).
Without a ``test/`` folder a stratified test split is held out with a fixed seed
(:data:`TEST_SEED`), so every run on the same folder content tests on the same images and none
of them trains another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..decode_pool import decode_in_order, usable_cores
from ..errors import UserError
from ..images import printable, without_name
from . import cache
from .dataset import HOLDOUT_FRACTION, Arrays, stratified_split

log = logging.getLogger(__name__)

PREFIX = "folder:"
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
CACHE_KEEP = 3  # folder caches kept (each is N × 3 × S² bytes: 10,000 at 160 px = 768 MB)
TEST_SEED = 0
CHUNK = 64  # files per worker task: ~0.2 s of decoding, so the progress bar moves smoothly


@dataclass(frozen=True)
class Problem:
    path: str  # relative to the folder; a class folder ends with "/"
    reason: str

    def line(self) -> str:
        return f"{printable(self.path)}: {self.reason}"


@dataclass
class Report:
    """What was found: usable images per split, and every file or class left out."""

    root: Path
    classes: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    held_out_test: bool = False
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{n:,} {split}" for split, n in self.counts.items() if n]
        test = " (held out of the training images, seed 0)" if self.held_out_test else ""
        names = ", ".join(printable(c) for c in self.classes)
        left = f"; {len(self.problems)} left out" if self.problems else ""
        return f"{self.root}: {len(self.classes)} classes ({names}); {', '.join(parts)}{test}{left}"

    def lines(self) -> list[str]:
        return [p.line() for p in self.problems]


def parse(source: str) -> Path | None:
    """The folder of a ``folder:PATH`` source; None for any other source."""
    if not source.startswith(PREFIX):
        return None
    path = source[len(PREFIX) :]
    if not path:
        raise UserError("--data folder: needs a path, e.g. --data folder:~/photos")
    return Path(path).expanduser()


def check(root: Path) -> None:
    """Fail in the first second, before any model is built."""
    if not root.is_dir():
        raise UserError(
            f"--data folder:{root}: no such folder (relative paths start at {Path.cwd()})"
        )


# --------------------------------------------------------------------------- scanning


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".")


def _files_under(folder: Path, rel: str) -> list[str]:
    """Relative paths of the regular files under ``folder`` (hidden ones skipped, symlinked
    folders not followed: a link cycle must not hang the scan), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        sub = Path(dirpath).relative_to(folder)
        for name in filenames:
            if not name.startswith("."):
                out.append(str(Path(rel) / sub / name))
    return sorted(out)


@dataclass
class _Scan:
    """Candidate files per split and class, before decoding."""

    files: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (split, class)
    problems: list[Problem] = field(default_factory=list)
    split_layout: bool = False  # train/ (test/, val/) rather than class folders at the top


def _scan_classes(root: Path, split: str | None, scan: _Scan) -> None:
    base = root / split if split else root
    prefix = f"{split}/" if split else ""
    for entry in sorted(base.iterdir(), key=lambda e: e.name):
        if not _visible(entry):
            continue
        if entry.is_dir():
            scan.files[(split or "train", entry.name)] = _files_under(entry, prefix + entry.name)
        elif not (split is None and entry.name in SPLITS):
            scan.problems.append(Problem(prefix + entry.name, "not inside a class folder"))


def _scan(root: Path) -> _Scan:
    scan = _Scan(split_layout=(root / "train").is_dir())
    if not scan.split_layout:
        _scan_classes(root, None, scan)
        return scan
    for split in SPLITS:
        if (root / split).is_dir():
            _scan_classes(root, split, scan)
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if _visible(entry) and entry.name not in SPLITS:
            reason = "ignored: with train/, only train/, val/ and test/ are read"
            scan.problems.append(Problem(entry.name + ("/" if entry.is_dir() else ""), reason))
    return scan


def _fingerprint(root: Path, names: list[str]) -> list[list[Any]]:
    out = []
    for name in names:
        st = (root / name).stat()
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------- decoding


def decode_all(
    root: Path, names: list[str], size: int, workers: int, progress: bool
) -> tuple[np.ndarray, list[str]]:
    """uint8 ``[N,size,size,3]`` and one error text per file ("" when it decoded), decoding
    chunks of :data:`CHUNK` files in ``workers`` processes (:mod:`..decode_pool`; in this one
    when ``workers`` is 1: nothing else would overlap with a single worker)."""
    from tqdm import tqdm

    out = np.zeros((len(names), size, size, 3), np.uint8)
    errors = [""] * len(names)
    starts = range(0, len(names), CHUNK)
    chunks = (([str(root / n) for n in names[s : s + CHUNK]], names[s : s + CHUNK]) for s in starts)
    decoded = decode_in_order(chunks, size, workers if workers > 1 else 0)
    with tqdm(total=len(names), desc="decoding", unit="img", disable=not progress) as bar:
        for start, (pixels, _, errs) in zip(starts, decoded, strict=True):
            out[start : start + len(pixels)] = pixels
            errors[start : start + len(errs)] = errs
            bar.update(len(errs))
    return out, errors


# --------------------------------------------------------------------------- loading


def _decoded(
    root: Path,
    names: list[str],
    size: int,
    workers: int,
    progress: bool,
    cache_dir: Any,
    source: str,
) -> tuple[torch.Tensor, list[str]]:
    """uint8 ``[N,3,size,size]`` for ``names`` and their errors, through the tensor cache.
    When the folder changed, only new and changed files are decoded: the others are taken
    from the previous cache (adding 10 photos to 10,000 costs 10 decodes, not 10,010)."""
    entries = _fingerprint(root, names)
    fingerprint = [size, entries]
    folder = cache.tensor_dir(cache_dir)
    # A folder's cache is named by its path alone (as before CSV lists), any other by source.
    named = str(root) if source == PREFIX + str(root) else source
    key = hashlib.sha1(f"{named}|{size}".encode()).hexdigest()[:12]
    path = folder / f"folder-{key}.pt"

    def exact(blob: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        x, errors = blob["x"], blob["errors"]
        if x.dtype != torch.uint8 or tuple(x.shape) != (len(names), 3, size, size):
            raise UserError(f"holds {tuple(x.shape)} {x.dtype}, not {len(names)}×3×{size}²")
        if not isinstance(errors, list) or len(errors) != len(names):
            raise UserError("its error list does not match the files")
        return x, errors

    hit = cache.read(path, CACHE_VERSION, fingerprint, exact)
    if hit is not None:
        return hit
    earlier = cache.read(path, CACHE_VERSION, None, lambda blob: _rows(blob, size)) or {}
    x, errors = _decode_changed(root, names, entries, size, workers, progress, earlier)
    cache.write(path, CACHE_VERSION, fingerprint, {"x": x}, {"errors": errors})
    cache.prune(folder, "folder-*.pt", CACHE_KEEP)
    return x, errors


def _rows(blob: dict[str, Any], size: int) -> dict[tuple, tuple[torch.Tensor, str]]:
    """An earlier cache's rows by (name, bytes, mtime): uint8 [3,size,size] and error text."""
    stored_size, entries = blob["fingerprint"]
    x, errors = blob["x"], blob["errors"]
    if stored_size != size or not len(entries) == len(x) == len(errors):
        raise UserError("its rows do not match its files")
    return {tuple(e): (x[i], errors[i]) for i, e in enumerate(entries)}


def _decode_changed(
    root: Path,
    names: list[str],
    entries: list[list[Any]],
    size: int,
    workers: int,
    progress: bool,
    earlier: dict[tuple, tuple[torch.Tensor, str]],
) -> tuple[torch.Tensor, list[str]]:
    x = torch.empty(len(names), 3, size, size, dtype=torch.uint8)
    errors = [""] * len(names)
    todo = []
    for i, entry in enumerate(entries):
        if tuple(entry) in earlier:
            x[i], errors[i] = earlier[tuple(entry)]
        else:
            todo.append(i)
    started = time.perf_counter()
    pixels, new_errors = decode_all(root, [names[i] for i in todo], size, workers, progress)
    seconds = time.perf_counter() - started
    if todo:
        x[todo] = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # [n,S,S,3] → [n,3,S,S]
    for i, error in zip(todo, new_errors, strict=True):
        errors[i] = error
    log.info(
        "decoded %d new or changed files in %.1f s (%.0f img/s, %d workers); %d from the cache",
        len(todo),
        seconds,
        len(todo) / max(seconds, 1e-9),
        workers,
        len(names) - len(todo),
    )
    return x, errors


def _classes(scan: _Scan, usable: dict[str, bool], report: Report) -> tuple[str, ...]:
    """Training classes with ≥ 2 usable images; every other class folder is reported."""
    classes = []
    for (split, name), files in scan.files.items():
        good = sum(usable[f] for f in files)
        if split != "train":
            continue
        where = f"{split}/{name}/" if scan.split_layout else f"{name}/"
        if good >= 2:
            classes.append(name)
        elif good == 1:
            report.problems.append(Problem(where, "class with one usable image; needs 2"))
        else:
            report.problems.append(Problem(where, "empty class: no usable images"))
    for (split, name), files in scan.files.items():
        if split != "train" and name not in classes and any(usable[f] for f in files):
            report.problems.append(Problem(f"{split}/{name}/", "class not trained (train/)"))
    return tuple(sorted(classes))


def load(
    root: Path,
    *,
    store_size: int,
    test_size: int | None = None,
    strict: bool = False,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[Arrays, Report]:
    """The folder as :class:`Arrays` (``source`` = ``folder:<absolute path>``) and its report;
    a one-line UserError when fewer than two classes are usable, or on any problem with
    ``strict``."""
    check(root)
    root = root.resolve()
    return load_scanned(
        root, _scan(root), PREFIX + str(root), store_size=store_size, test_size=test_size,
        strict=strict, workers=workers, progress=progress, cache_dir=cache_dir,
    )  # fmt: skip


def load_scanned(
    root: Path,
    scan: _Scan,
    source: str,
    *,
    store_size: int,
    test_size: int | None,
    strict: bool,
    workers: int | None,
    progress: bool,
    cache_dir: str | Path | None,
) -> tuple[Arrays, Report]:
    """Decode (through the cache), report and split the files of ``scan`` (paths relative to
    ``root``): what a folder and a CSV list share once their files are known."""
    names = [f for files in scan.files.values() for f in files]
    x, errors = _decoded(
        root, names, store_size, workers or usable_cores(), progress, cache_dir, source
    )
    report = Report(root, problems=list(scan.problems))
    report.problems += [
        Problem(n, without_name(e, n)) for n, e in zip(names, errors, strict=True) if e
    ]
    usable = {n: not e for n, e in zip(names, errors, strict=True)}
    classes = _classes(scan, usable, report)
    report.problems.sort(key=lambda p: p.path)
    report.classes = classes
    if len(classes) < 2:
        where, layout = (
            (root, "PATH/<class>/*.jpg, or PATH/train/<class>/...")
            if source.startswith(PREFIX)
            else (source.split(":", 1)[1], "rows of path,label")
        )
        raise UserError(
            f"{where}: {len(classes)} usable class folder(s); training needs at least 2, each "
            f"with 2 or more images ({layout})"
        )
    if strict and report.problems:
        for line in report.lines():
            log.error("%s", line)
        raise UserError(
            f"{root}: {len(report.problems)} file(s) or class(es) unusable with --strict "
            f"(first: {report.problems[0].line()}); fix them or drop --strict"
        )
    arrays = _arrays(root, scan, names, x, usable, classes, test_size, report)
    return dataclasses.replace(arrays, source=source), report


def _arrays(
    root: Path,
    scan: _Scan,
    names: list[str],
    x: torch.Tensor,
    usable: dict[str, bool],
    classes: tuple[str, ...],
    test_size: int | None,
    report: Report,
) -> Arrays:
    row = {n: i for i, n in enumerate(names)}
    parts: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in SPLITS}
    for (split, name), files in scan.files.items():
        if name in classes:
            for f in files:
                if usable[f]:
                    parts[split][0].append(row[f])
                    parts[split][1].append(classes.index(name))

    def take(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx, labels = parts[split]
        return x[idx], torch.tensor(labels, dtype=torch.int64), [names[i] for i in idx]

    train_x, train_y, train_files = take("train")
    val_x, val_y, val_files = take("val")
    test_x, test_y, test_files = take("test")
    val_index = None
    if len(val_files):  # a val/ folder: appended to train, its rows are the validation split
        val_index = torch.arange(len(train_files), len(train_files) + len(val_files))
        train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
        train_files += val_files
    if not len(test_files):
        if val_index is not None:
            raise UserError(f"{root}: has val/ but no test/; add test/ or merge val/ into train/")
        n = int(len(train_y) * HOLDOUT_FRACTION) if test_size is None else test_size
        keep, held = stratified_split(train_y, n, TEST_SEED, "--test-size")
        keep = keep.sort().values  # file order, so the cache order is the same every time
        test_x, test_y, test_files = train_x[held], train_y[held], [train_files[i] for i in held]
        train_x, train_y = train_x[keep], train_y[keep]
        train_files = [train_files[i] for i in keep]
        report.held_out_test = True
    elif test_size is not None:
        raise UserError(f"{root} has a test/ folder; --test-size is for folders without one")
    report.counts = {"train": len(train_y) - len(val_files), "val": len(val_files)}
    report.counts["test"] = len(test_y)
    return Arrays(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=classes,
        source=PREFIX + str(root),
        train_files=tuple(train_files),
        test_files=tuple(test_files),
        val_index=val_index,
        left_out=tuple(report.lines()),
    )
