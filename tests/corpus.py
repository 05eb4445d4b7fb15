"""A corpus of bad and unusual image files, generated on the fly, with what each should give.

``expected`` kind: None = must be predicted; otherwise the ImageError kind (which the server
maps to a status code).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Base image for orientation tests: asymmetric so every flip/rotation is distinguishable.
BASE = np.zeros((32, 32, 3), np.uint8)
BASE[:16, :, 0] = 255  # top half red
BASE[:, :8, 2] = 255  # left strip blue
BASE[30:, 28:, 1] = 255  # bottom-right green corner

# Pillow's exif_transpose applies these for orientations 2..8; we store the inverse.
_INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def oriented_png(orientation: int) -> bytes:
    im = Image.fromarray(BASE)
    if _INVERSE[orientation] is not None:
        im = im.transpose(_INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _png(im, exif=exif.tobytes())


def huge_header_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width×height, with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def bad_crc_png() -> bytes:
    data = bytearray(_png(Image.fromarray(BASE)))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    im = Image.fromarray(ramp)
    assert im.mode == "I;16", im.mode
    return _png(im)


def corpus() -> dict[str, tuple[bytes, str | None]]:
    """name → (file bytes, expected ImageError kind or None for "predicted")."""
    rng = np.random.default_rng(0)
    good_jpeg = _jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    files: dict[str, tuple[bytes, str | None]] = {
        "empty.png": (b"", "empty"),
        "random.bin": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_image"),
        "text.jpg": (b"this is not a jpeg, just text\n" * 20, "not_image"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "undecodable"),
        "bad_crc.png": (bad_crc_png(), "undecodable"),
        "drawing.svg": (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect width="32" height="32"/></svg>',
            "unsupported",
        ),
        "doc.pdf": (
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
            "unsupported",
        ),
        "huge_header.png": (huge_header_png(), "too_many_pixels"),
        "animated.gif": (animated_gif(), None),
        "cmyk.jpg": (_jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0))), None),
        "sixteen_bit.png": (sixteen_bit_png(), None),
        "one_pixel.png": (_png(Image.new("RGB", (1, 1), (10, 200, 30))), None),
        "very_wide.png": (_png(Image.new("RGB", (4000, 3), (0, 0, 255))), None),
        "transparent.png": (_png(rgba), None),
        "palette_transparent.png": (_png(palette), None),
        "grey.png": (_png(Image.new("L", (32, 32), 77)), None),
        "photo.jpg": (good_jpeg, None),
    }
    for o in range(1, 9):
        files[f"orientation_{o}.png"] = (oriented_png(o), None)
    return files


def write(folder: Path) -> dict[str, str | None]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (payload, kind) in corpus().items():
        (folder / name).write_bytes(payload)
        expected[name] = kind
    return expected
