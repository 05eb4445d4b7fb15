"""Reference values for the CIFAR-10-C tests (issue 23), computed once with the published
generator (``make_cifar_c.py`` in hendrycks/robustness) and stored as small fixtures, so the
tests compare against the reference without needing its libraries (Wand/ImageMagick,
scikit-image, OpenCV). Also writes the frost textures the reference draws from.

Run it in an environment of its own (the project's tests never need these packages):

    apt-get install libmagickwand-dev
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install numpy scipy scikit-image wand opencv-python-headless pillow \\
        imagecorruptions
    /tmp/refvenv/bin/python benchmarks/cifar_c_reference.py \\
        --make-cifar-c PATH/TO/robustness/ImageNet-C/create_c/make_cifar_c.py \\
        --data ../shared/cifar10/cifar-10-batches-py

The reference runs with today's libraries after four minimal API patches (``multichannel``
→ ``channel_axis``, ``np.float_`` → ``np.float64``, ``np.fromstring`` → ``np.frombuffer``,
``scipy.ndimage.interpolation`` → ``scipy.ndimage``);
its torch/torchvision imports and its ``__main__`` loop are left out.

Writes:
* ``src/cifar10_resnet50/evaluation/frost/frost{1..5}.png``: the reference's frost photographs
  (from the ``imagecorruptions`` package's data, the same files as hendrycks/robustness;
  Apache-2.0) as the reference uses them: ``cv2.resize(fx=0.2, fy=0.2)`` (bilinear), RGB.
  Only frost1–5 are ever drawn (``np.random.randint(5)``).
* ``tests/fixtures/cifar_c_reference.npz``: the first 256 test images; the reference's motion
  blur of the first 16 at fixed angles (all severities: deterministic given the angle, so the
  test compares pixels); and the mean strength (mean |corrupted − clean| in 0–255 levels,
  after the reference's ``np.uint8``) of glass blur, frost and snow at each severity over the
  256 images × 8 seeds.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FROST_OUT = ROOT / "src" / "cifar10_resnet50" / "evaluation" / "frost"
FIXTURE = ROOT / "tests" / "fixtures" / "cifar_c_reference.npz"
IMAGES, MOTION_IMAGES, SEEDS = 256, 16, 8


def reference(path: Path) -> dict:
    """The generator's functions, patched for today's libraries, without its main loop."""
    source = path.read_text()
    source = source[: source.index("import collections\n\nprint(")]
    for old, new in (
        ("import torch\n", ""),
        ("import torchvision.datasets as dset\n", ""),
        ("import torchvision.transforms as trn\n", ""),
        ("import torch.utils.data as data\n", ""),
        ("multichannel=True", "channel_axis=-1"),
        ("np.float_", "np.float64"),
        ("np.fromstring", "np.frombuffer"),
        ("from scipy.ndimage.interpolation import map_coordinates", "from scipy.ndimage import map_coordinates"),
    ):  # fmt: skip
        source = source.replace(old, new)
    namespace: dict = {"__name__": "make_cifar_c"}
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 (the published script)
    return namespace


def strength(fn, images: np.ndarray, severity: int) -> float:
    diffs = []
    for seed in range(SEEDS):
        np.random.seed(seed)
        for x in images:
            out = np.uint8(fn(Image.fromarray(x), severity))  # as the published data set
            diffs.append(np.abs(out.astype(np.float64) - x).mean())
    return float(np.mean(diffs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make-cifar-c", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="cifar-10-batches-py folder")
    p.add_argument(
        "--accuracy-out",
        type=Path,
        help="also write the reference's corrupted first 1,000 test images of glass blur, "
        "motion blur, snow and frost (all severities, seed 0) here, for "
        "benchmarks/cifar_c_vs_reference.py (~60 MB; not a fixture)",
    )
    args = p.parse_args()
    import imagecorruptions

    frost_dir = Path(imagecorruptions.__file__).parent / "frost"
    FROST_OUT.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        name = next(frost_dir.glob(f"frost{i}.*"))
        small = cv2.resize(cv2.imread(str(name)), (0, 0), fx=0.2, fy=0.2)
        Image.fromarray(small[..., ::-1]).save(FROST_OUT / f"frost{i}.png", optimize=True)

    with open(args.data / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = batch[b"data"][:IMAGES].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    ref = reference(args.make_cifar_c)
    angles = np.linspace(-45, 45, MOTION_IMAGES)
    motion = np.zeros((5, MOTION_IMAGES, 32, 32, 3), np.uint8)
    uniform = np.random.uniform
    for s in range(1, 6):
        for i, (x, angle) in enumerate(zip(images[:MOTION_IMAGES], angles, strict=True)):
            np.random.uniform = lambda *a, angle=angle: angle  # the angle the reference draws
            motion[s - 1, i] = np.uint8(ref["motion_blur"](Image.fromarray(x), s))
    np.random.uniform = uniform
    os.chdir(frost_dir)  # frost reads './frost1.png' ...
    if args.accuracy_out:
        clean = batch[b"data"][:1000].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        out = {"images": clean, "labels": np.array(batch[b"labels"][:1000])}
        for name in ("glass_blur", "motion_blur", "snow", "frost"):
            np.random.seed(0)
            out[name] = np.stack([
                np.stack([np.uint8(ref[name](Image.fromarray(x), s)) for x in clean])
                for s in range(1, 6)
            ])  # fmt: skip
        np.savez_compressed(args.accuracy_out, **out)
    strengths = {
        name: [strength(ref[name], images, s) for s in range(1, 6)]
        for name in ("glass_blur", "frost", "snow")
    }
    np.savez_compressed(FIXTURE, images=images, motion_angles=angles, motion=motion,
                        **{f"{k}_strength": np.array(v) for k, v in strengths.items()})  # fmt: skip
    for k, v in strengths.items():
        print(k, " ".join(f"{x:.3f}" for x in v))


if __name__ == "__main__":
    main()
