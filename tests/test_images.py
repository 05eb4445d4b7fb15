import numpy as np
import pytest

from cifar10_resnet50 import images
from cifar10_resnet50.errors import UserError
from corpus import BASE, corpus, huge_header_png, oriented_png

CORPUS = corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_is_decoded_or_rejected_with_the_right_kind(name):
    payload, expected = CORPUS[name]
    if expected is None:
        out = images.decode(payload, name, size=32)
        assert out.pixels.shape == (32, 32, 3) and out.pixels.dtype == np.uint8
    else:
        with pytest.raises(images.ImageError) as info:
            images.decode(payload, name, size=32)
        assert info.value.kind == expected
        assert isinstance(info.value, UserError) and name in str(info.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_exif_orientations_come_out_upright(orientation):
    out = images.decode(oriented_png(orientation), "o.png", size=32)
    assert np.array_equal(out.pixels, BASE)


def test_huge_header_is_refused_before_decoding(monkeypatch):
    from PIL import ImageFile

    def must_not_decode(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(images.ImageError) as info:
        images.decode(
            huge_header_png(12000, 12000), "big.png", size=32
        )  # 144 MP: above our limit only
    assert info.value.kind == "too_many_pixels" and "144,000,000" in str(info.value)


def test_alpha_and_palette_transparency_composite_on_white():
    for name in ("transparent.png", "palette_transparent.png"):
        assert (images.decode(CORPUS[name][0], size=32).pixels == 255).all(), name


def test_sixteen_bit_is_scaled_not_clipped_to_white():
    px = images.decode(CORPUS["sixteen_bit.png"][0], size=32).pixels
    assert px[..., 0].min() < 20 and px[..., 0].max() > 235  # the full ramp survives
    assert 100 < px.mean() < 155
    assert (px[..., 0] == px[..., 1]).all()  # still grey


def test_cmyk_red_becomes_rgb_red():
    px = images.decode(CORPUS["cmyk.jpg"][0], size=32).pixels.astype(int)
    assert px[..., 0].mean() > 200 and px[..., 1].mean() < 60 and px[..., 2].mean() < 60


def test_animated_gif_uses_the_first_frame():
    px = images.decode(CORPUS["animated.gif"][0], size=32).pixels.astype(int)
    assert px[..., 0].mean() > 200 and px[..., 1].mean() < 60


def test_large_images_are_center_cropped_then_resized():
    from PIL import Image

    im = np.zeros((100, 300, 3), np.uint8)
    im[:, 100:200] = 255  # the centre square is white, the sides black
    import io

    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "PNG")
    out = images.decode(buf.getvalue(), size=32)
    assert out.original_size == (300, 100)
    assert out.pixels.min() >= 250


def test_32px_images_pass_through_unchanged():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert np.array_equal(images.decode(buf.getvalue(), size=32).pixels, arr)


def test_read_file_limits(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(images.ImageError) as info:
        images.read_file(big, max_bytes=1024, size=32)
    assert info.value.kind == "too_large"
    with pytest.raises(images.ImageError):
        images.read_file(tmp_path / "missing.png", size=32)
