"""Decoding user images safely into the model's input: uint8 RGB 32×32.

Shared by ``predict`` and ``serve``. Every failure is an :class:`ImageError` whose ``kind``
says what went wrong (the server maps kinds to HTTP status codes, ``predict`` to one line on
stderr).

Resize policy for images that are not 32×32: the model learned from 32×32 CIFAR-10 photos
(upsampled inside the model), so a user's image is first brought to that same form — the
largest centred square is cropped (CIFAR-10 objects are centred and square), then resized to
32×32 with Pillow's antialiasing Lanczos filter (a plain resize of a large photo would alias).
32×32 inputs pass through untouched.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from .errors import UserError

SIZE = 32
MAX_PIXELS = MAX_IMAGE_PIXELS
MAX_BYTES = MAX_IMAGE_BYTES
# Signatures of common image formats: a file that starts like one but will not open is a
# damaged image (422), not a non-image (415).
_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
)


class ImageError(UserError):
    """``kind``: empty | too_large | not_image | unsupported | undecodable | too_many_pixels."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 [32,32,3] RGB
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str


def _to_rgb(im) -> Image.Image:  # noqa: F821 (PIL imported lazily)
    """Any Pillow mode → 8-bit RGB, the way a person expects to see the image."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit int) greyscale: scale the real range to 0–255. Pillow's own
        # convert("L") clips values > 255 to white, which turns a 16-bit photo white.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        grey = ((arr - lo) / (hi - lo or 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")  # palette transparency becomes alpha
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    # L, 1, CMYK (Pillow inverts Adobe CMYK JPEGs correctly), YCbCr, LAB, HSV, RGBX, ...
    return im.convert("RGB")


def _center_square_32(im: Any) -> np.ndarray:
    from PIL import Image

    w, h = im.size
    if (w, h) != (SIZE, SIZE):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy()


def decode(data: bytes, name: str = "image", *, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Bytes of any image Pillow reads → uint8 ``[32,32,3]``; raise :class:`ImageError`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("empty", f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that; we decide.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError as e:
        head = data[:256].lstrip().lower()
        if head.startswith((b"<svg", b"<?xml")) or b"<svg" in head:
            raise ImageError(
                "unsupported", f"{name}: SVG is a vector format; send PNG or JPEG"
            ) from e
        if head.startswith(b"%pdf"):
            raise ImageError("unsupported", f"{name}: PDF is not an image; send PNG or JPEG") from e
        if data.startswith(_IMAGE_MAGIC):
            raise ImageError(
                "undecodable", f"{name}: damaged image header (bad checksum or fields)"
            ) from e
        raise ImageError("not_image", f"{name}: not an image Pillow can read") from e
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", f"{name}: {e}") from e
    except Exception as e:  # malformed headers raise assorted errors
        raise ImageError("undecodable", f"{name}: cannot read the image header ({e})") from e
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(
                "too_many_pixels",
                f"{name}: {w}×{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}",
            )
        if w < 1 or h < 1:
            raise ImageError("undecodable", f"{name}: image has no pixels ({w}×{h})")
        fmt = im.format or "unknown"
        try:
            im.seek(0)  # animated images: the first frame
            im.load()  # decode now, so truncation and CRC errors surface here
            im = ImageOps.exif_transpose(im)  # camera orientation, as viewers show it
            rgb = _to_rgb(im)
            pixels = _center_square_32(rgb)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError("undecodable", f"{name}: damaged or truncated {fmt} data ({e})") from e
        except Image.DecompressionBombError as e:
            raise ImageError("too_many_pixels", f"{name}: {e}") from e
        return Decoded(pixels, rgb.size, fmt)


def read_file(path, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Read and decode an image file, with the same limits as the server."""
    from pathlib import Path

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(
                "too_large", f"{path}: {size:,} bytes exceeds the limit of {max_bytes:,}"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ImageError("unreadable", f"{path}: cannot read ({e.strerror or e})") from e
    return decode(data, str(path), max_pixels=max_pixels)
