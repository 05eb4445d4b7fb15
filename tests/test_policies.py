"""Per-image augmentation policies (``--augment trivial|randaugment``, ``--resized-crop``;
issue 21): each op does what torchvision's functional op does, every image draws its own,
and the draws are keyed by the batch (exact resume)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cifar10_resnet50.config import AugmentConfig
from cifar10_resnet50.data import augment, policies

LEVEL = 0.3  # of each op's range


def _reference(name: str, img: torch.Tensor, space: policies.Space) -> torch.Tensor:
    """torchvision's functional op for image ``img`` at LEVEL, sign +."""
    f = 1 + LEVEL * space.enhance
    shear = math.degrees(math.atan(LEVEL * space.shear))
    shift = round(LEVEL * space.translate * img.shape[-1])
    return {
        "identity": lambda: img,
        "shear_x": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0]),
        "shear_y": lambda: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear]),
        "translate_x": lambda: TF.affine(img, angle=0.0, translate=[-shift, 0], scale=1.0, shear=[0.0, 0.0]),
        "translate_y": lambda: TF.affine(img, angle=0.0, translate=[0, -shift], scale=1.0, shear=[0.0, 0.0]),
        "rotate": lambda: TF.rotate(img, LEVEL * space.rotate),
        "brightness": lambda: TF.adjust_brightness(img, f),
        "color": lambda: TF.adjust_saturation(img, f),
        "contrast": lambda: TF.adjust_contrast(img, f),
        "sharpness": lambda: TF.adjust_sharpness(img, f),
        "posterize": lambda: TF.posterize(img, int(8 - round(LEVEL * (8 - space.min_bits)))),
        "solarize": lambda: TF.solarize(img, 255 * (1 - LEVEL)),
        "autocontrast": lambda: TF.autocontrast(img),
        "equalize": lambda: TF.equalize(img),
    }[name]()  # fmt: skip


@pytest.mark.parametrize("space", [policies.WIDE, policies.RAND], ids=["wide", "randaugment"])
def test_each_op_is_torchvisions_on_its_own_image_of_the_batch(space):
    """One batch, image i drawing op i: each equals torchvision's functional op on that image
    (±1 grey level for the blends, which torchvision rounds differently; translations are a
    fraction of the width, so 32 px images move by whole pixels here)."""
    x = torch.randint(0, 256, (len(policies.OPS), 3, 40, 40), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    n = len(policies.OPS)
    out = policies.apply_ops(x, torch.arange(n), torch.full((n,), LEVEL), torch.ones(n), space)
    for i, name in enumerate(policies.OPS):
        diff = (out[i].int() - _reference(name, x[i], space).int()).abs()
        assert diff.max() <= 1, name
        if name in ("color", "contrast", "brightness", "sharpness"):
            assert (x[i] != out[i]).any(), name  # the op did something


def test_every_image_draws_its_own_op_and_the_batch_key_replays_them():
    """64 copies of one image come out in many different ways (one op per image, not one per
    batch as torchvision's and kornia's policies), and the same key gives the same batch."""
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    x = one.expand(64, -1, -1, -1).contiguous()
    for policy in ("trivial", "randaugment"):
        a = policies.apply_policy(x, torch.Generator().manual_seed(5), policy)
        b = policies.apply_policy(x, torch.Generator().manual_seed(5), policy)
        assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
        assert len({bytes(img.flatten().tolist()) for img in a}) >= 20, policy


def test_random_resized_crops_differ_per_image_and_keep_the_whole_image_at_scale_one():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    crops = policies.random_resized_crop(x, torch.Generator().manual_seed(3), min_scale=0.25)
    assert crops.shape == x.shape and crops.dtype == torch.uint8
    assert (crops != x).flatten(1).any(1).all()
    # A whole-area square crop is the image itself: the geometry has no off-by-half-pixel.
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).repeat(16, 1, 1)
    assert torch.equal(policies.warp(x.float(), theta, mode="bilinear").round().byte(), x)


def test_resumed_epochs_replay_the_policies_exactly():
    """Batches from batch 3 on equal the whole epoch's from batch 3 (the keyed randomness that
    exact resume rests on), with the policy and random-resized-crop on."""
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(96) % 10
    recipe = AugmentConfig(policy="randaugment", resized_crop=0.35, mixup=0.2)
    kw = dict(batch_size=16, seed=1, epoch=2, recipe=recipe, num_classes=10)
    full = list(augment.train_batches(x, y, **kw))
    tail = list(augment.train_batches(x, y, start=3, **kw))
    plain = list(augment.train_batches(x, y, **{**kw, "recipe": AugmentConfig(mixup=0.2)}))
    for a, b in zip(full[3:], tail, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a[1:], b[1:], strict=True))
    assert not torch.equal(full[0][1], plain[0][1])  # the recipe changed the images
