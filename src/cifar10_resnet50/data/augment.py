"""Batched on-device augmentation and the epoch's batches, for every data source.

Written by hand for speed, as airbench does: the whole training split lives on the training
device as one uint8 tensor (CIFAR-10: 45,000×3×32×32 = 138 MB), and a batch is an index into
it plus a few batched tensor ops (crop, flip, the per-image policies of ``policies``,
mixup/CutMix). No PIL, no DataLoader, no
per-image Python. :func:`train_batches` is the one place that calls them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from ..config import AugmentConfig
from . import policies
from .dataset import Arrays

# ``--crop-padding`` is given in pixels of a 32 px image (the usual CIFAR convention) and
# scales with the stored size, so 4 px at 32 px is the same 12.5 % shift at 160 px.
PADDING_REFERENCE = 32


PLAIN = AugmentConfig()  # the default recipe: padded crop and flip


def scaled_padding(padding: int, image_size: int) -> int:
    return round(padding * image_size / PADDING_REFERENCE)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """A distinct, reproducible seed per (run, epoch, batch).

    Randomness keyed by position rather than drawn from a running generator makes a resumed
    run (even one resumed mid-epoch) see exactly the batches the uninterrupted run would.
    """
    return ((seed * 1_000_003 + epoch) * 1_000_003 + batch) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The epoch's order of ``n`` images: a permutation; or, given their ``labels`` (int64
    [n], CPU: ``--balanced-sampling``), n draws with replacement, each class equally likely
    (torch's ``WeightedRandomSampler`` rule, keyed by the epoch as everything here)."""
    gen = torch.Generator().manual_seed(batch_seed(seed, epoch, -1))
    if labels is None:
        return torch.randperm(n, generator=gen)
    counts = torch.bincount(labels).double()
    return torch.multinomial(1.0 / counts[labels], n, replacement=True, generator=gen)


def random_crop_flip(
    x: torch.Tensor, gen: torch.Generator, padding: int, flip: bool
) -> torch.Tensor:
    """Batched random crop (from a reflect-padded image) and horizontal flip, in uint8.

    # uint8 [B,3,H,W] → uint8 [B,3,H,W]; one gather for the whole batch instead of B crops.
    """
    b, _, h, w = x.shape
    if padding > 0:
        # Instead of padding B images and cropping each, shift per-image row/col index vectors
        # and reflect them at the borders: one gather, no padded copy.
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device) - padding
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device) - padding
        rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]  # [B,H]
        cols = torch.arange(w, device=x.device)[None, :] + dx[:, None]  # [B,W]
        # Reflect at the borders (index -1 → 1, H → H-2), as reflect padding does.
        rows = torch.where(rows < 0, -rows, rows)
        rows = torch.where(rows > h - 1, 2 * (h - 1) - rows, rows)
        cols = torch.where(cols < 0, -cols, cols)
        cols = torch.where(cols > w - 1, 2 * (w - 1) - cols, cols)
        bi = torch.arange(b, device=x.device)[:, None, None]
        # Advanced indices on dims 0,2,3 with a slice between → result [B,H,W,C].
        x = x[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    seed: int,
    gen: torch.Generator,
    mixup: float,
    cutmix: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix on a uint8 batch; returns images and soft targets ``float [B,C]``.

    Mixing is done in uint8 space (rounded): at most ±0.5/255 per pixel, invisible next to the
    mix itself, and it keeps the model's uint8 input contract.
    """
    rnd = random.Random(seed)
    use_cutmix = cutmix > 0 and (mixup == 0 or rnd.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = rnd.betavariate(alpha, alpha)
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = (1 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = rnd.randrange(h), rnd.randrange(w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        x = (x.float() * lam + x[perm].float() * (1 - lam)).round_().to(torch.uint8)
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    return x, onehot * lam + onehot[perm] * (1 - lam)


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    return n // (batch_size * world_size)


def train_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    recipe: AugmentConfig = PLAIN,
    num_classes: int | None = None,  # for mixup/CutMix's soft targets
    rank: int = 0,
    world_size: int = 1,
    steps: int | None = None,
    rows: torch.Tensor | None = None,
    device: torch.device | None = None,
    balanced: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(batch_index, images, labels, targets)`` for one epoch, from batch ``start`` on,
    augmented as ``recipe`` says (:func:`augment_batch`). ``rows``: the images of ``x`` to
    train on (int64 on ``x``'s device; default all), picked per batch so the training split
    needs no copy of its own: the batches equal those of ``x[rows]``.

    ``x``: uint8 [N,3,S,S] on the training ``device`` (default: ``x``'s), or in pinned host
    memory when the images do not fit on the GPU: each batch is then gathered on the host and
    copied asynchronously, and augmented on the device as before (the same random numbers,
    drawn there). ``targets`` are the labels, or soft labels float [B,C] with mixup/CutMix.
    The last incomplete batch is dropped (a BatchNorm batch of 1 is undefined).

    With torchrun, a step's *global* batch (``batch_size × world_size`` images of one global
    order) is augmented and mixed as a whole, with randomness keyed by (seed, epoch, batch),
    and each rank takes its slice: the same images, crops and mixes as one process with the
    global batch, so runs agree whatever the process count (tested).

    ``steps`` ends the epoch early (``--steps-per-epoch``): its batches are then a random
    sample of the images, a different one each epoch. ``balanced``: each epoch draws its
    images with replacement, every class equally often (:func:`epoch_order`).
    """
    n = len(x) if rows is None else len(rows)
    labels = (y if rows is None else y[rows]).cpu() if balanced else None
    order = epoch_order(n, seed, epoch, labels).to(x.device)
    if rows is not None:
        order = rows[order]
    full = steps_per_epoch(n, batch_size, world_size)
    steps = full if steps is None else min(steps, full)  # fewer: the epoch's first batches
    global_batch = batch_size * world_size
    device = x.device if device is None else device
    streamed = device != x.device
    for i in range(start, steps):
        idx = order[i * global_batch : (i + 1) * global_batch]
        xb, yb = x[idx], y[idx]  # uint8 [B×W,3,S,S], int64 [B×W]
        if streamed:  # host → device; pinned, so the copy overlaps the device's work
            xb = xb.pin_memory().to(device, non_blocking=True)
            yb = yb.pin_memory().to(device, non_blocking=True)
        xb, target = augment_batch(xb, yb, batch_seed(seed, epoch, i), recipe, num_classes)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        yield i, xb[mine], yb[mine], target[mine]


def augment_batch(
    xb: torch.Tensor, yb: torch.Tensor, key: int, recipe: AugmentConfig, num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through the recipe, on its device, each step from a generator seeded by
    ``key`` (so resuming anywhere replays it): the padded crop or random-resized-crop, the
    flip, the per-image policy (TrivialAugment/RandAugment), then mixup/CutMix. uint8
    [B,3,S,S], int64 [B] → uint8 [B,3,S,S] and the targets (labels, or soft float [B,C])."""
    device = xb.device
    gen = torch.Generator(device=device).manual_seed(key)
    if recipe.resized_crop > 0:
        xb = policies.random_resized_crop(xb, gen, recipe.resized_crop)
        xb = random_crop_flip(xb, gen, 0, recipe.flip)
    else:
        xb = random_crop_flip(
            xb, gen, scaled_padding(recipe.crop_padding, xb.shape[-1]), recipe.flip
        )
    if recipe.policy != "none":
        policy_gen = torch.Generator(device=device).manual_seed(key + 2)
        xb = policies.apply_policy(xb, policy_gen, recipe.policy)
    if recipe.mixup > 0 or recipe.cutmix > 0:
        assert num_classes is not None, "mixup/CutMix need num_classes"
        mix_gen = torch.Generator(device=device).manual_seed(key + 1)
        return mix_batch(xb, yb, num_classes, key, mix_gen, recipe.mixup, recipe.cutmix)
    return xb, yb


def sample_batch(
    arrays: Arrays, *, n: int, seed: int, recipe: AugmentConfig
) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` images of epoch 0's first batch, augmented exactly as training does
    (fastai's ``show_batch``), with their label (or the two mixed labels and weights)."""
    batches = train_batches(
        arrays.train_x,
        arrays.train_y,
        batch_size=n,
        seed=seed,
        epoch=0,
        recipe=recipe,
        num_classes=len(arrays.classes),
    )
    _, xb, yb, soft = next(batches)
    titles = [arrays.classes[y] for y in yb.tolist()]
    if recipe.mixup > 0 or recipe.cutmix > 0:
        titles = []
        for row in soft:
            w, idx = row.topk(2)
            parts = [
                f"{arrays.classes[i]} {v:.2f}"
                for v, i in zip(w.tolist(), idx.tolist(), strict=True)
                if v > 0
            ]
            titles.append("\n".join(parts))
    return xb, titles
