"""CIFAR-10-C on the fly (issue 8): the corruptions, the sweep's accounting, evaluate on every
kind of model file, compare."""

import colorsys
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cifar10_resnet50.evaluation import compare, evaluate, robustness
from cifar10_resnet50.evaluation import corruptions as C
from cifar10_resnet50.serving import export


@pytest.fixture(scope="module")
def images():
    """12 smooth, coloured 32 px images (blurred noise: like photos, unlike pure noise)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((12, 3, 8, 8), generator=gen)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return (x * 255).to(torch.uint8)


RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform"}  # fmt: skip


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_each_corruption_changes_images_deterministically_and_keeps_uint8(images, name):
    for severity in C.SEVERITIES:
        out = C.corrupt(images, name, severity, seed=0)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert not torch.equal(out, images), (name, severity)
        assert torch.equal(out, C.corrupt(images, name, severity, seed=0))
        if name in RANDOM:
            assert not torch.equal(out, C.corrupt(images, name, severity, seed=1))


@pytest.mark.parametrize(
    "name",
    ["gaussian_noise", "impulse_noise", "defocus_blur", "zoom_blur", "fog", "brightness",
     "contrast"],
)  # fmt: skip
def test_higher_severity_changes_images_more(images, name):
    change = [
        float((C.corrupt(images, name, s).float() - images.float()).abs().mean())
        for s in C.SEVERITIES
    ]
    assert change == sorted(change), change


def test_the_simple_corruptions_match_their_definitions(images):
    x = images.float() / 255
    means = x.mean(dim=(2, 3), keepdim=True)
    contrast = (((x - means) * 0.4 + means).clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(C.corrupt(images, "contrast", 3), contrast)
    # brightness: HSV value + 0.3 (colorsys as the reference)
    r, g, b = (x[0, :, 5, 7]).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    expected = [int(c * 255) for c in colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1))]
    got = C.corrupt(images, "brightness", 5)[0, :, 5, 7].tolist()
    assert all(abs(a - b) <= 1 for a, b in zip(got, expected, strict=True))
    # JPEG quality 40 and pixelate 0.65 as Pillow makes them
    im = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=40)
    jpeg = np.asarray(Image.open(buf).convert("RGB"))
    assert np.array_equal(C.corrupt(images, "jpeg_compression", 5)[0].permute(1, 2, 0), jpeg)
    small = im.resize((20, 20), Image.BOX).resize((32, 32), Image.BOX)
    assert np.array_equal(C.corrupt(images, "pixelate", 5)[0].permute(1, 2, 0), np.asarray(small))


def test_sweep_counts_every_set_and_summarises_it(images):
    labels = torch.arange(12) % 10
    clean = {bytes(img.numpy()): int(y) for img, y in zip(images, labels, strict=True)}

    def knows_only_clean_images(batch):  # right on the originals, wrong on anything changed
        return torch.tensor([clean.get(bytes(img.numpy()), 10) for img in batch])

    report = robustness.sweep(knows_only_clean_images, images, labels, progress=False)
    assert report["clean_accuracy"] == 1.0 and report["images"] == 12
    assert set(report["accuracy"]) == set(C.CORRUPTIONS)
    assert all(len(row) == 5 for row in report["accuracy"].values())
    assert report["mean_corruption_accuracy"] == 0.0 and report["relative_drop"] == 1.0
    always_zero = robustness.sweep(lambda b: torch.zeros(len(b), dtype=torch.long), images,
                                   labels, progress=False)  # fmt: skip
    assert always_zero["mean_corruption_accuracy"] == pytest.approx(2 / 12)
    assert always_zero["relative_drop"] == pytest.approx(0.0)
    assert "mean corruption accuracy" in robustness.table(report)


def test_stratified_subset_is_balanced_and_seeded():
    labels = torch.arange(1000) % 10
    chosen = robustness.stratified(labels, 95, seed=0)
    counts = torch.bincount(labels[chosen], minlength=10)
    assert len(chosen) == 95 and counts.max() - counts.min() <= 1
    assert torch.equal(chosen, robustness.stratified(labels, 95, seed=0))
    assert not torch.equal(chosen, robustness.stratified(labels, 95, seed=1))


@pytest.fixture(scope="module")
def onnx_model(tiny_checkpoint, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return export.run(
        tiny_checkpoint, "onnx", out=out, data_dir=synthetic_root, parity_images=50
    ).path


def test_evaluate_sweeps_checkpoints_and_onnx_exports_alike(
    tiny_checkpoint, onnx_model, synthetic_root, tmp_path
):
    ckpt = evaluate.run(
        tiny_checkpoint, data_dir=synthetic_root, out_dir=tmp_path / "a", corruptions=True,
        corruption_images=10, precision="fp32", progress=False, test_images=1000,
    )  # fmt: skip
    exported = evaluate.run(
        onnx_model, data_dir=synthetic_root, out_dir=tmp_path / "b", corruptions=True,
        corruption_images=10, progress=False, test_images=1000,
    )  # fmt: skip
    for out, report in ((tmp_path / "a", ckpt), (tmp_path / "b", exported)):
        saved = json.loads((out / "robustness.json").read_text())
        assert saved["images"] == 10 and len(saved["accuracy"]) == 15
        assert (out / "robustness.png").stat().st_size > 1000
        assert "mean corruption accuracy" in report.table()
    assert exported.metrics["accuracy"] == pytest.approx(ckpt.metrics["accuracy"], abs=0.002)
    a, b = ckpt.robustness["accuracy"], exported.robustness["accuracy"]
    assert sum(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True)) <= 75 * 0.1


def test_compare_puts_two_models_side_by_side(
    tiny_checkpoint, onnx_model, synthetic_root, tmp_path
):
    onnx = onnx_model
    rows = compare.run([str(tiny_checkpoint.parent), str(onnx)], out=tmp_path / "cmp",
                       data_dir=synthetic_root, corruption_images=5, test_images=500,
                       progress=False)  # fmt: skip
    assert [r.path for r in rows] == [str(tiny_checkpoint), str(onnx)]
    assert all(0 <= r.ece <= 1 and r.images_per_s > 0 and r.size_mb > 1 for r in rows)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"]) == 2
    assert "img/s" in compare.table(rows)
    with pytest.raises(Exception, match="at least two"):
        compare.run([str(onnx)], out=tmp_path / "x")


# ---------------------------------------------------------------- against the reference
# Values computed once with the published generator (make_cifar_c.py, Wand/ImageMagick,
# scikit-image, OpenCV) by benchmarks/cifar_c_reference.py: see its docstring for how.


@pytest.fixture(scope="module")
def reference():
    from pathlib import Path

    with np.load(Path(__file__).parent / "fixtures" / "cifar_c_reference.npz") as f:
        return {k: f[k] for k in f.files}


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def test_motion_blur_matches_imagemagick_pixel_for_pixel_at_the_same_angles(reference):
    x = _nchw(reference["images"][: len(reference["motion_angles"])]).float() / 255
    angles = torch.from_numpy(reference["motion_angles"])
    for severity, (radius, sigma) in enumerate(C.PARAMS["motion_blur"], 1):
        ours = (C.motion_blur_at(x, radius, sigma, angles).clamp(0, 1) * 255).to(torch.uint8)
        theirs = _nchw(reference["motion"][severity - 1])
        diff = (ours.int() - theirs.int()).abs()
        # 99.3–99.6 % equal when measured on 1,000 images; the rest one level off (float
        # rounding): with trunc(v + 0.5) offsets it was 63–76 %.
        assert (diff == 0).float().mean() >= 0.98 and diff.max() <= 2, (severity, diff.max())


@pytest.mark.parametrize("name", ["glass_blur", "frost", "snow"])
def test_random_corruptions_have_the_reference_strength_at_every_severity(reference, name):
    """Mean |corrupted − clean| over the reference's 256 images, within 2 % of the
    reference's (8 draws each) at each severity (before: glass blur 1.10–1.42× the
    reference's strength, frost 0.71–0.76×). Ours averages 32 draws per image for frost and
    snow, whose strength varies so much per draw that 8 leave ±0.6 % of noise beside the
    reference's own; glass blur is steady (and slow: a loop over the pixels), so 8."""
    draws = 8 if name == "glass_blur" else 32
    x = _nchw(np.tile(reference["images"], (draws, 1, 1, 1)))
    want = reference[f"{name}_strength"]
    got = [(C.corrupt(x, name, s).float() - x.float()).abs().mean().item() for s in range(1, 6)]
    ratios = [g / w for g, w in zip(got, want, strict=True)]
    assert all(abs(r - 1) <= 0.02 for r in ratios), [f"{r:.3f}" for r in ratios]
