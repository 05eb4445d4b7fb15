"""CIFAR-10: download, safe extraction, verification, and loading into uint8 tensors
``[N,3,32,32]`` through the tensor cache.

The only module that knows CIFAR-10's facts: its URL and md5 sums, its ten class names, its
32 px images and its 50,000 + 10,000 split.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, first_line
from ..fileio import file_digest, mkstemp_beside, remove_stale_temps, temp_dir_beside
from . import cache
from .cache import user_cache_dir
from .dataset import Arrays

log = logging.getLogger(__name__)

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIZE = 32  # pixels a side
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
# md5 of each extracted file of the official archive (the same values torchvision checks).
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
# The only members the archive may hold; readme.html ships in the official archive.
_ALLOWED_MEMBERS = {f"{BATCH_DIR}/{name}" for name in (*FILE_MD5, "readme.html")}
CACHE_VERSION = 3  # 2: adds the content sha256; 3: the shared cache format (data/cache.py)
# Each cache file is ~185 MB (60,000 × 3,072 uint8 + labels); keeping the three most recently
# used source folders bounds the cache at ~0.55 GB however many copies a user loads.
CACHE_KEEP = 3
ENV_DATA_DIR = "CIFAR10_DATA_DIR"


# --------------------------------------------------------------------------- locations


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder that holds (or will hold) ``cifar-10-batches-py/``.

    Order: the flag, then $CIFAR10_DATA_DIR, then ``<user cache>/data``. Pointing at the
    ``cifar-10-batches-py`` folder itself is accepted too.
    """
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR) or user_cache_dir() / "data"
    path = Path(data_dir).expanduser()
    if path.name == BATCH_DIR and (path / "batches.meta").exists():
        path = path.parent
    return path


def check_download_target(root: Path, explicit: bool) -> None:
    """A data folder the user named (flag or $CIFAR10_DATA_DIR) must exist: a typo must not
    become a new folder and three download attempts. The default cache folder is created."""
    explicit = explicit or bool(os.environ.get(ENV_DATA_DIR))
    if explicit and not root.exists():
        raise UserError(
            f"data folder {root} does not exist (relative paths start at {Path.cwd()}); fix "
            f"--data-dir or ${ENV_DATA_DIR}, or run 'cifar10-resnet50 data download --data-dir "
            f"{root}' to download CIFAR-10 there"
        )


# --------------------------------------------------------------------------- download


Opener = Callable[[str, float], Any]


def _urlopen(url: str, timeout: float) -> Any:
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (https URL we chose)


def download_file(
    url: str,
    dest: Path,
    md5: str,
    *,
    timeout: float = 30.0,
    attempts: int = 3,
    opener: Opener = _urlopen,
    progress: bool = True,
) -> Path:
    """Stream ``url`` to ``dest`` via a temporary file; verify md5; rename into place.

    Retries ``attempts`` times (with a growing pause) on network errors and on md5 mismatch.
    On failure nothing is left at ``dest`` or beside it, and a :class:`UserError` explains
    the offline alternative.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent)  # parts of downloads that were killed
    last_error = "unknown error"
    for attempt in range(1, attempts + 1):
        fd, tmp = mkstemp_beside(dest)
        try:
            with os.fdopen(fd, "wb") as out, opener(url, timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=f"download {dest.name}",
                    disable=not progress,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if total is not None and tmp.stat().st_size != total:
                raise OSError(f"incomplete: got {tmp.stat().st_size} of {total} bytes")
            got = file_digest(tmp, "md5")
            if got != md5:
                raise OSError(f"md5 mismatch: expected {md5}, got {got}")
            os.replace(tmp, dest)
            return dest
        except (OSError, urllib.error.URLError, TimeoutError) as e:
            last_error = str(getattr(e, "reason", None) or e)
            log.warning("download attempt %d/%d failed: %s", attempt, attempts, last_error)
            if attempt < attempts:
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(
        f"could not download {url} after {attempts} attempts ({last_error}). "
        f"Offline? Fetch {ARCHIVE_NAME} on another machine, extract it, and pass "
        f"--data-dir to the folder holding {BATCH_DIR}/ (or set ${ENV_DATA_DIR})."
    )


def safe_extract(archive: Path, dest_root: Path) -> Path:
    """Extract the CIFAR-10 archive into ``dest_root/cifar-10-batches-py``.

    Every member is checked before anything is written: only the expected regular files
    (and their folder) are accepted, so absolute paths, ``..``, links and devices are refused.
    Files are extracted into a temporary folder that is renamed into place at the end.
    """
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as e:
        raise UserError(
            f"{archive} is not a readable tar archive ({e}); delete it and retry"
        ) from e
    with tar:
        members = tar.getmembers()
        for m in members:
            name = m.name
            if name.startswith("/") or ".." in Path(name).parts:
                raise UserError(f"refusing to extract {archive}: unsafe member path {name!r}")
            if m.isdir() and name.rstrip("/") == BATCH_DIR:
                continue
            if not m.isfile():
                raise UserError(
                    f"refusing to extract {archive}: member {name!r} is not a regular file "
                    "(links and devices are not allowed)"
                )
            if name not in _ALLOWED_MEMBERS:
                raise UserError(f"refusing to extract {archive}: unexpected member {name!r}")
        present = {m.name for m in members if m.isfile()}
        missing = sorted(f"{BATCH_DIR}/{n}" for n in FILE_MD5 if f"{BATCH_DIR}/{n}" not in present)
        if missing:
            raise UserError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 archive")

        final = dest_root / BATCH_DIR
        with temp_dir_beside(final) as tmp_dir:
            for m in members:
                if not m.isfile():
                    continue
                src = tar.extractfile(m)
                assert src is not None  # regular files always have a payload
                with src, open(tmp_dir / Path(m.name).name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
    return final


def download(
    data_dir: str | Path | None,
    *,
    url: str = URL,
    opener: Opener = _urlopen,
    progress: bool = True,
) -> Path:
    """Make sure ``cifar-10-batches-py`` exists under the data folder; download if it does not."""
    root = resolve_data_dir(data_dir)
    if (root / BATCH_DIR).is_dir():
        log.info("CIFAR-10 already present in %s", root / BATCH_DIR)
        return root
    log.info("downloading CIFAR-10 to %s", root)
    archive = download_file(url, root / ARCHIVE_NAME, ARCHIVE_MD5, opener=opener, progress=progress)
    try:
        safe_extract(archive, root)
    finally:
        archive.unlink(missing_ok=True)  # 163 MB we no longer need; the batches are verified
    return root


# --------------------------------------------------------------------------- verify and load


def _batch_folder(root: Path) -> Path:
    folder = root / BATCH_DIR
    if not folder.is_dir():
        raise UserError(
            f"no CIFAR-10 at {folder}. Run 'cifar10-resnet50 data download --data-dir {root}', "
            f"or pass --data-dir (or ${ENV_DATA_DIR}) to a folder holding {BATCH_DIR}/"
        )
    return folder


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, numbers and
    numpy arrays. Any other global (``os.system``, ``builtins.eval``...) is refused before it
    is looked up, so a hostile ``data_batch_1`` cannot run code (plain ``pickle.load`` would)."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 names
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"{module}.{name}")


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing; re-download CIFAR-10 or fix --data-dir")
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise UserError(
            f"{path} is not a CIFAR-10 batch: its pickle asks for {e}, which the format never "
            "holds (refused, nothing was run); replace the file"
        ) from None
    except Exception as e:  # truncated or garbage pickles raise many different types
        raise UserError(
            f"{path} is unreadable ({type(e).__name__}: {first_line(e)}); the file is corrupt — "
            "delete the folder and download again"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a CIFAR-10 batch (a dict); it is corrupt")
    return obj


def _labels(path: Path, raw: Any, count: int) -> np.ndarray:
    """``raw`` as int64 labels 0–9, or a UserError naming ``path`` and the exact problem."""
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise UserError(
                f"{path}: 'labels' is a {raw.dtype} array of shape {raw.shape}, "
                "not a list of integers 0–9"
            )
        raw = raw.tolist()
    if not isinstance(raw, list):
        raise UserError(f"{path}: 'labels' is a {type(raw).__name__}, not a list of integers")
    if len(raw) != count:
        raise UserError(f"{path}: {len(raw)} labels for {count} images; the file is damaged")
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(
                f"{path}: label {i} is {v!r} ({type(v).__name__}); labels must be integers 0–9"
            )
        if not 0 <= v <= 9:
            raise UserError(f"{path}: label {i} is {v}, outside 0–9; the file is damaged")
    return np.asarray(raw, dtype=np.int64)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{path} lacks 'data' or 'labels'; it is not a CIFAR-10 batch")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (10000, 3072):
        found = (
            f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        )
        raise UserError(
            f"{path}: data must be a uint8 10000×3072 array, found {found}; "
            "the file is not CIFAR-10 or is damaged"
        )
    return data, _labels(path, batch["labels"], len(data))


def _read_classes(folder: Path) -> tuple[str, ...]:
    meta = _unpickle(folder / "batches.meta")
    raw = meta.get("label_names", ())
    names = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
    if names != CLASSES:
        raise UserError(
            f"{folder / 'batches.meta'}: class names {names} are not CIFAR-10's {CLASSES}"
        )
    return names


def _check_counts(path_desc: str, labels: np.ndarray, per_class: int) -> None:
    counts = np.bincount(labels, minlength=10)
    if not (counts == per_class).all():
        raise UserError(
            f"{path_desc}: expected {per_class} images per class, found {counts.tolist()}"
        )


def _check_arrays(where: str, arrays: Arrays) -> None:
    """What a loaded copy must satisfy; the tensor cache is held to it on every load."""
    shapes = (
        tuple(arrays.train_x.shape) == (50000, 3, IMAGE_SIZE, IMAGE_SIZE)
        and tuple(arrays.test_x.shape) == (10000, 3, IMAGE_SIZE, IMAGE_SIZE)
        and arrays.train_x.dtype == arrays.test_x.dtype == torch.uint8
        and tuple(arrays.train_y.shape) == (50000,)
        and tuple(arrays.test_y.shape) == (10000,)
        and arrays.train_y.dtype == arrays.test_y.dtype == torch.int64
    )
    if not shapes:
        raise UserError(f"{where}: not CIFAR-10's shapes (50,000 + 10,000 uint8 3×32×32)")
    for labels in (arrays.train_y, arrays.test_y):
        if int(labels.min()) < 0 or int(labels.max()) > 9:
            raise UserError(f"{where}: labels outside 0–9")
    _check_counts(where, arrays.train_y.numpy(), 5000)
    _check_counts(where, arrays.test_y.numpy(), 1000)


def read_folder(root: str | Path) -> Arrays:
    """Parse and structurally check the 7 files; raise a one-line UserError on any problem."""
    folder = _batch_folder(Path(root))
    classes = _read_classes(folder)
    parts = [_read_batch(folder / name) for name in TRAIN_FILES]
    train_data = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_data, test_labels = _read_batch(folder / "test_batch")
    # The official batches are not balanced one by one (data_batch_1 has 1,005 planes), only
    # the five together.
    _check_counts(f"{folder}/data_batch_1..5 together", train_labels, 5000)
    _check_counts(str(folder / "test_batch"), test_labels, 1000)
    # uint8 [N,3072] → uint8 [N,3,32,32]: each row is the 1024 R values, then G, then B.
    return Arrays(
        train_x=torch.from_numpy(train_data).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE),
        train_y=torch.from_numpy(train_labels),
        test_x=torch.from_numpy(test_data).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE),
        test_y=torch.from_numpy(test_labels),
        classes=classes,
    )


@dataclass(frozen=True)
class VerifyReport:
    folder: Path
    kind: str  # "official" (all md5s match) or "structure" (a valid copy with other bytes)
    mismatched: tuple[str, ...]

    def describe(self) -> str:
        if self.kind == "official":
            return f"{self.folder}: official CIFAR-10 (all 7 md5 sums match)"
        return (
            f"{self.folder}: valid CIFAR-10 structure (7 files, 10000×3072 uint8 per batch, "
            "labels 0–9, 5,000/1,000 per class, class names), but not the official bytes: "
            f"md5 differs for {', '.join(self.mismatched)} (for example a re-encoded copy)"
        )


def verify(root: str | Path) -> VerifyReport:
    """Official md5s when they match, otherwise a full structural check."""
    folder = _batch_folder(Path(root))
    mismatched = []
    for name, md5 in FILE_MD5.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing; re-download CIFAR-10 or fix --data-dir")
        if file_digest(path, "md5") != md5:
            mismatched.append(name)
    if not mismatched:
        return VerifyReport(folder, "official", ())
    read_folder(root)
    return VerifyReport(folder, "structure", tuple(mismatched))


def _fingerprint(folder: Path) -> list[list[Any]]:
    """Cheap identity of the source files (name, size, mtime): a changed file misses the cache."""
    out = []
    for name in (*TRAIN_FILES, "test_batch", "batches.meta"):
        st = (folder / name).stat()
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _from_cache(blob: dict[str, Any]) -> Arrays:
    arrays = Arrays(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], CLASSES)
    _check_arrays("tensor cache", arrays)
    return arrays


def load(root: str | Path, cache_dir: str | Path | None = None) -> Arrays:
    """Load CIFAR-10 as uint8 tensors, through a one-file cache (about 0.3 s instead of ~2 s),
    keyed by the batch files' names, sizes and mtimes (see :mod:`.cache`)."""
    folder = _batch_folder(Path(root))
    for name in (*TRAIN_FILES, "test_batch", "batches.meta"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} is missing; re-download CIFAR-10 or fix --data-dir")
    fingerprint = _fingerprint(folder)
    cache_root = cache.tensor_dir(cache_dir)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    path = cache_root / f"cifar10-{key}.pt"
    arrays = cache.read(path, CACHE_VERSION, fingerprint, _from_cache)
    if arrays is not None:
        return arrays
    arrays = read_folder(folder.parent)
    tensors = {k: getattr(arrays, k) for k in ("train_x", "train_y", "test_x", "test_y")}
    cache.write(path, CACHE_VERSION, fingerprint, tensors, {"source": str(folder.resolve())})
    cache.prune(cache_root, "cifar10-*.pt", CACHE_KEEP)
    return arrays


def is_present(root: str | Path) -> bool:
    return (Path(root) / BATCH_DIR / "batches.meta").is_file()
