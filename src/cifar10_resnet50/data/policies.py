"""Per-image augmentation policies on the whole batch, on the device: TrivialAugment-Wide
(Müller & Hutter 2021), RandAugment (Cubuk et al. 2020; N = 2 ops at magnitude 9 of 31, as
torchvision's defaults) and random-resized-crop.

Each image draws its own op, magnitude and sign, as the papers define them; the batch is then
transformed at once, without a host sync and without a Python loop over images: every op
family is computed for the whole batch and each image keeps what it drew (all geometric ops
are one affine warp with a matrix per image; the enhance ops one blend with a degenerate image
and a factor per image). Written here because the field's libraries do not do this:
torchvision's ``TrivialAugmentWide``/``RandAugment`` and kornia's ``TrivialAugment`` draw one
op per call, so per-image ops need a call per image; they also draw from the global RNG,
while ours come from the batch's keyed generator (exact resume, the same batches on every
caller). Measured against both: ``benchmarks/augment_policies.py``, BENCHMARKS.md.

The op set and magnitude ranges are torchvision's (``_augmentation_space``), with
translations given as a fraction of the image (torchvision's 32 px of 32 for the wide space,
150/331 for RandAugment), so they scale with the stored size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from ..config import AUGMENT_POLICIES as POLICIES  # noqa: F401 (re-exported)

OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
BINS = 31  # magnitude bins, as torchvision


@dataclasses.dataclass(frozen=True)
class Space:
    """Each op's magnitude at the top bin (linear from 0 at bin 0)."""

    shear: float
    translate: float  # fraction of the width
    rotate: float  # degrees
    enhance: float  # brightness/color/contrast/sharpness factor 1 ± this
    min_bits: int  # posterize: 8 bits at bin 0 down to this


WIDE = Space(shear=0.99, translate=1.0, rotate=135.0, enhance=0.99, min_bits=2)
RAND = Space(shear=0.3, translate=150 / 331, rotate=30.0, enhance=0.9, min_bits=4)
RAND_OPS, RAND_MAGNITUDE = 2, 9


def apply_policy(x: torch.Tensor, gen: torch.Generator, policy: str) -> torch.Tensor:
    """``policy`` (one of :data:`POLICIES`) on each image. uint8 [B,3,H,W] → uint8 [B,3,H,W]."""
    if policy == "trivial":
        return one_op_each(x, gen, WIDE, magnitude=None)
    if policy == "randaugment":
        for _ in range(RAND_OPS):
            x = one_op_each(x, gen, RAND, magnitude=RAND_MAGNITUDE)
        return x
    assert policy == "none", policy
    return x


def one_op_each(
    x: torch.Tensor, gen: torch.Generator, space: Space, magnitude: int | None
) -> torch.Tensor:
    """One op per image (uniform over :data:`OPS`), at ``magnitude`` (a bin; None: uniform
    per image, as TrivialAugment), with a random sign where the op has one."""
    b, dev = x.shape[0], x.device
    op = torch.randint(0, len(OPS), (b,), generator=gen, device=dev)
    if magnitude is None:
        level = torch.randint(0, BINS, (b,), generator=gen, device=dev).float() / (BINS - 1)
    else:
        level = torch.full((b,), magnitude / (BINS - 1), device=dev)
    sign = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)
    return apply_ops(x, op, level, sign, space)


def apply_ops(
    x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, space: Space
) -> torch.Tensor:
    """Image i gets op ``OPS[op[i]]`` at ``level[i]`` (0..1 of the space's range) and
    ``sign[i]`` (±1). uint8 [B,3,H,W] → uint8 [B,3,H,W]."""
    chose = {name: op == i for i, name in enumerate(OPS)}  # bool [B] per op
    signed = level * sign
    y = x.float()  # 0..255, integer-valued until an op changes it
    geometric = chose["shear_x"] | chose["shear_y"] | chose["translate_x"] | chose["translate_y"]
    geometric = geometric | chose["rotate"]
    y = _each(y, geometric, _affine, _theta(chose, signed, space))
    f = 1.0 + signed * space.enhance  # the enhance ops' factor
    for name in ("brightness", "color", "contrast", "sharpness"):
        y = _each(y, chose[name], _ENHANCE[name], f)
    y = _each(y, chose["posterize"], _posterize, 8 - (level * (8 - space.min_bits)).round())
    y = _each(y, chose["solarize"], _solarize, 255.0 * (1 - level))
    y = _each(y, chose["autocontrast"], _autocontrast)
    y = _each(y, chose["equalize"], lambda v: TF.equalize(v.byte()).float())
    return y.round().clamp_(0, 255).to(torch.uint8)


def _each(
    x: torch.Tensor, chosen: torch.Tensor, fn: Callable[..., torch.Tensor], *per_image: torch.Tensor
) -> torch.Tensor:
    """``fn`` (images, per-image values...) on the images ``chosen`` (bool [B]) picked."""
    if x.device.type == "cpu":  # a host sync is free here: compute the chosen images only
        rows = chosen.nonzero().flatten()
        if not len(rows):
            return x
        return x.index_copy_(0, rows, fn(x[rows], *(v[rows] for v in per_image)))  # x: ours
    # On a GPU, no host sync (it would stall the queue every step): every image, each
    # keeping its own result.
    return torch.where(chosen[:, None, None, None], fn(x, *per_image), x)


def _theta(chose: dict[str, torch.Tensor], signed: torch.Tensor, s: Space) -> torch.Tensor:
    """Shear, translate and rotate as one affine map per image (output → input coordinates,
    normalised: 2 per image width), about the centre as torchvision's ``affine``."""
    theta = torch.eye(2, 3, device=signed.device).repeat(len(signed), 1, 1)  # [B,2,3]
    angle = torch.where(chose["rotate"], signed * math.radians(s.rotate), 0.0)
    cos, sin = angle.cos(), angle.sin()
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 1] += torch.where(chose["shear_x"], signed * s.shear, 0.0)
    theta[:, 1, 0] += torch.where(chose["shear_y"], signed * s.shear, 0.0)
    theta[:, 0, 2] = torch.where(chose["translate_x"], signed * s.translate * 2, 0.0)
    theta[:, 1, 2] = torch.where(chose["translate_y"], signed * s.translate * 2, 0.0)
    return theta


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour with black outside, as torchvision's policies."""
    return warp(x, theta, mode="nearest")


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """float [B,C,H,W] sampled through per-image affine maps ``theta`` [B,2,3]."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + f · (x − degenerate)``, f per image."""
    return (degenerate + f[:, None, None, None] * (x - degenerate)).clamp(0, 255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (the 3×3 box with the centre weighted 5, over 13) as a box mean:
    4× faster than a depthwise conv on a CPU. The border keeps its pixels, as PIL's."""
    out = x.clone()
    box = F.avg_pool2d(x, 3, stride=1) * 9
    out[..., 1:-1, 1:-1] = ((box + 4 * x[..., 1:-1, 1:-1]) / 13).round()
    return out


_ENHANCE = {
    "brightness": lambda x, f: _blend(x, torch.zeros_like(x), f),
    "color": lambda x, f: _blend(x, _gray(x), f),
    "contrast": lambda x, f: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f),
    "sharpness": lambda x, f: _blend(x, _blurred(x), f),
}


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits of each (integer-valued) pixel."""
    step = (2.0 ** (8 - bits))[:, None, None, None]
    x = x.round()
    return x - torch.remainder(x, step)


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    x = x.round()
    return torch.where(x >= threshold[:, None, None, None], 255.0 - x, x)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to 0..255 (unchanged where it is flat)."""
    x = x.round()
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return torch.where(high > low, (x - low) * 255.0 / (high - low).clamp(min=1), x)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, min_scale: float) -> torch.Tensor:
    """Each image a random crop of ``min_scale``..1 of its area with aspect ratio 3/4..4/3
    (log-uniform), resized back to its size (bilinear): Inception's crop, as torchvision's
    ``RandomResizedCrop``, drawn per image and done in one warp. uint8 [B,3,H,W] → same."""
    b, dev = x.shape[0], x.device
    area = min_scale + (1 - min_scale) * torch.rand(b, generator=gen, device=dev)
    log_ratio = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * math.log(4 / 3)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the width and height
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - w)  # centre, normalised
    cy = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    return warp(x.float(), theta, mode="bilinear").round_().clamp_(0, 255).to(torch.uint8)
