"""What every data source returns: a dataset held in memory as uint8 tensors, and the seeded,
stratified splits carved from it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import UserError

# Default hold-outs when no size is given: a tenth of the images (CIFAR-10: 5,000 of 50,000
# for validation, as before this default was written as a fraction).
HOLDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Arrays:
    """A dataset in memory. Images are uint8 ``[N,3,S,S]`` (RGB planes; ``S`` is the stored
    size, the model's input size), labels int64 ``[N]`` indexing ``classes``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    # How to load it again (recorded in checkpoints, so evaluate finds the same test set).
    source: str = "cifar10"
    # Folder sources: each training and test image's path, relative to the folder (the run
    # records its splits by file, not by index).
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    # A validation split given by the source (a ``val/`` folder): indices into ``train_x``.
    val_index: torch.Tensor | None = None
    # Files and class folders the source left out, one "path: reason" line each.
    left_out: tuple[str, ...] = ()

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def split(
        self, val_size: int | None, seed: int, subset: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, validation) indices into ``train_x``: the source's own validation images,
        else a stratified hold-out of ``val_size`` (default a tenth of the images, or of
        ``subset`` when given: a quick run validates quickly), seeded by ``seed``; then the
        first ``subset`` training indices only."""
        if val_size is None and subset is not None and self.val_index is None:
            val_size = max(len(self.classes), subset // 10)
        train, val = self._split(val_size, seed)
        return (train if subset is None else train[:subset]), val

    def _split(self, val_size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.val_index is not None:
            if val_size is not None:
                raise UserError(
                    f"{self.source} has its own val/ folder; drop --val-size (it sizes the "
                    "hold-out carved from train/ when there is no val/)"
                )
            keep = torch.ones(len(self.train_y), dtype=torch.bool)
            keep[self.val_index] = False
            train = torch.nonzero(keep).flatten()
            gen = torch.Generator().manual_seed(seed)
            return train[torch.randperm(len(train), generator=gen)], self.val_index
        if val_size is None:
            val_size = int(len(self.train_y) * HOLDOUT_FRACTION)
        return stratified_split(self.train_y, val_size, seed)


def _quotas(counts: list[int], size: int) -> list[int]:
    """``size`` spread over classes in proportion to ``counts`` (largest remainder, ties to
    the lower class), leaving every class at least one image outside the hold-out."""
    total = sum(counts)
    exact = [size * c / total for c in counts]
    quota = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in order[: size - sum(quota)]:
        quota[c] += 1
    return [min(q, max(c - 1, 0)) for q, c in zip(quota, counts, strict=True)]


def stratified_split(
    labels: torch.Tensor, size: int, seed: int, flag: str = "--val-size"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of indices into (kept, held out), with ``size`` held out in proportion to
    each class's share (at most ``size``: a class always keeps one image).

    Both index sets come out shuffled, so a ``--subset`` prefix of the kept set is
    class-balanced in expectation.
    """
    if not 0 <= size < len(labels):
        raise UserError(f"{flag} must be between 0 and {len(labels) - 1} for this data")
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels).tolist()
    kept_parts, held_parts = [], []
    for c, k in enumerate(_quotas(counts, size)):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held_parts.append(idx[:k])
        kept_parts.append(idx[k:])
    kept = torch.cat(kept_parts)
    held = torch.cat(held_parts)
    kept = kept[torch.randperm(len(kept), generator=gen)]
    held = held[torch.randperm(len(held), generator=gen)]
    return kept, held


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the bytes of CPU tensors: 0.11 s for CIFAR-10's 184 MB here (SHA-NI), so a
    cache with flipped bytes is caught on each load instead of training on damaged pixels."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def content_digest(arrays: Arrays) -> str:
    """Which pixels and labels these are (feature caches are keyed by it)."""
    return digest([arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y])
