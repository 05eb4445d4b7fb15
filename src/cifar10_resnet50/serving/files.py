"""The image files a ``predict`` run covers: files, folders (recursive) and glob patterns,
streamed in a stable order, each real file once, optionally one shard of them.

Streaming, so a folder of millions of files is never held as one list: memory per file is one
integer (the file's identity, to predict a file named twice once; ~70 bytes each, measured in
BENCHMARKS.md) plus, per folder being walked, its sorted listing of names.

The order is a depth-first walk with each folder's entries sorted by name, which is exactly
the order of ``sorted()`` over the paths (paths compare part by part): the same on every run
and every machine, which resume (skip what the partial output already holds) relies on.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

# Folders nest at most this deep below each argument: far past any photo library, and a
# bound on the walk even where links make the tree infinite.
MAX_DEPTH = 32


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


@dataclass(frozen=True)
class Shard:
    """``--shard K/N``: the K-th of N disjoint parts (1 ≤ K ≤ N). A file belongs to the part
    its path's hash names, so N machines given the same arguments cover every file exactly
    once, whatever order each lists them in (SLURM arrays, Kubernetes indexed jobs)."""

    index: int  # K, 1-based as array-job indices usually are
    count: int  # N

    @classmethod
    def parse(cls, text: str | None) -> Shard | None:
        if text is None:
            return None
        try:
            k, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise UserError(f"--shard {text!r}: expected K/N, e.g. 3/8") from None
        if not 1 <= k <= n:
            raise UserError(f"--shard {text}: K must be between 1 and N (e.g. 1/{max(n, 2)})")
        return cls(k, n)

    def __contains__(self, path: Path) -> bool:
        # blake2b, not hash(): Python salts str hashes per process.
        digest = hashlib.blake2b(os.fsencode(path), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _listing(folder: Path) -> list[tuple[str, bool]]:
    """(name, is_folder) for the files and folders in ``folder``, sorted by name. Links are
    followed (a link to a folder is a folder); anything else (sockets, broken links) is left
    out."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            try:
                if entry.is_dir():
                    entries.append((entry.name, True))
                elif entry.is_file():
                    entries.append((entry.name, False))
            except OSError:
                continue
    entries.sort()
    return entries


def walk(root: Path, max_depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Every file under ``root`` in sorted path order, following links, visiting each real
    folder once: folders are remembered by (device, inode), so links back to an ancestor (or
    two links to one folder) cannot loop; ``os.walk`` with ``followlinks`` alone would never
    end on them."""
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path, depth: int) -> Iterator[Path]:
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = _listing(folder)
        except OSError:
            return
        for name, is_folder in entries:
            if not is_folder:
                yield folder / name
            elif depth < max_depth:
                yield from visit(folder / name, depth + 1)

    yield from visit(root, 0)


def _split_glob(pattern: str) -> tuple[Path, list[str]]:
    """``a/b/**/*.png`` → (Path("a/b"), ["**", "*.png"]): the literal prefix and the rest."""
    parts = Path(pattern).parts
    literal = 0
    while literal < len(parts) - 1 and not glob.has_magic(parts[literal]):
        literal += 1
    base = Path(*parts[:literal]) if literal else Path(".")
    return base, list(parts[literal:])


def _match(parts: tuple[str, ...], pattern: list[str]) -> bool:
    """Glob semantics per path component; ``**`` matches zero or more folders. Names starting
    with a dot match only patterns that start with one, as in the shell and ``glob``."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for i in range(len(parts) + 1):
            if i > 0 and parts[i - 1].startswith("."):
                return False  # ** does not enter hidden folders
            if _match(parts[i:], rest):
                return True
        return False
    if not parts:
        return False
    name = parts[0]
    if name.startswith(".") and not head.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, head) and _match(parts[1:], rest)


def glob_files(pattern: str) -> Iterator[Path]:
    """The files ``pattern`` matches (``**`` too), in sorted order, with the loop-proof walk."""
    base, rest = _split_glob(pattern)
    depth = MAX_DEPTH if "**" in rest else len(rest) - 1
    return (p for p in walk(base, depth) if _match(p.relative_to(base).parts, rest))


def _identity(path: Path) -> int | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev << 64 | st.st_ino  # one int per file, not a tuple: half the memory


def iter_files(
    paths: list[str],
    on_missing: Callable[[Rejected], None],
    shard: Shard | None = None,
    output: str | None = None,
) -> Iterator[Path]:
    """The files to predict, streamed: each argument in turn, folders searched recursively
    for extensions Pillow knows, glob patterns expanded; each real file once (by device and
    inode, through links), only ``shard``'s part when given. An argument that names nothing
    is passed to ``on_missing`` when the stream reaches it. A file that is ``output`` (the
    results would replace an input image) stops the run with a UserError."""
    seen: set[int] = set()
    refuse = _identity(Path(output)) if output else None
    extensions: set[str] | None = None
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            extensions = extensions or image_extensions()
            candidates: Iterator[Path] = (f for f in walk(p) if f.suffix.lower() in extensions)
        elif p.is_file():
            candidates = iter([p])
        elif glob.has_magic(arg):
            candidates = glob_files(arg)
        else:
            on_missing(Rejected(arg, "no such file or folder"))
            continue
        matched = False
        for f in candidates:
            matched = True
            key = _identity(f)
            if key is None or key in seen:
                continue
            if key == refuse:
                raise UserError(
                    f"--output {output} is one of the input images ({f}); write the results elsewhere"
                )
            seen.add(key)
            # After the duplicates are gone: the shards' union is exactly the unsharded run.
            if shard is None or f in shard:
                yield f
        if not matched and glob.has_magic(arg) and not p.exists():
            on_missing(Rejected(arg, "no files match this pattern"))


def expand(paths: list[str], shard: Shard | None = None) -> tuple[list[Path], list[Rejected]]:
    """:func:`iter_files` as a list, and the arguments that named nothing."""
    missing: list[Rejected] = []
    return list(iter_files(paths, missing.append, shard)), missing
