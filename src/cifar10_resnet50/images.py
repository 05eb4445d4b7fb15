"""Decoding user images safely into the model's input: uint8 RGB ``size``×``size``, where
``size`` is the model's input size (from its metadata; a folder dataset's stored size).

Shared by ``predict``, ``serve`` and the folder data source (which decodes a whole folder in
worker processes through :func:`decode_many`). Every failure is an :class:`ImageError` whose ``kind``
says what went wrong (the server maps kinds to HTTP status codes, ``predict`` to one line on
stderr). *Any* exception while decoding one image is that image's error: Pillow and its
plugins raise far more than their documented types (``struct.error`` from a damaged EXIF
block, ``RuntimeError`` from AVIF, a plugin's own ``BLPFormatError``), and one bad file must
never abort a batch.

Costs are bounded before they are paid (a hostile file should cost milliseconds):

* pixels: the header's size is checked before decoding, and Pillow's own bomb check is set to
  the same limit, so an image *inside* a container (an ICO or ICNS entry holding a 13000×13000
  PNG) is refused when its own header is read, not after it is decoded;
* JPEG: at most :data:`MAX_JPEG_SCANS` scans (a progressive JPEG repeating one scan 10,000
  times took 137 s of CPU), and decoded in Pillow's reduced-size draft mode (libjpeg scales by
  1/2–1/8 during the IDCT: we only need ``size`` px, so a 12 MP photo decodes ~10× faster
  for a small input);
* time: reads of the file go through a reader that checks a per-image deadline, so any decoder
  that reads as it decodes (PNG, JPEG, GIF, WebP, containers) stops at the deadline;
* formats: everything Pillow reads except EPS, which Pillow renders by running Ghostscript on
  the file (code from the image, in effect).

Resize policy (for training folders and for predictions alike, so both see the same form):
the largest centred square is cropped (the shorter side, centred), then resized to
``size``×``size`` with Pillow's antialiasing Lanczos filter (a plain resize of a large photo
would alias). Images already ``size``×``size`` pass through untouched.
"""

from __future__ import annotations

import io
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError, first_line

# Limits for user images (predict and serve share them; serve's flags default to them).
MAX_BYTES = 20 * 1024 * 1024
# Refuse images above this many pixels before decoding them (a 30000×30000 PNG header would
# otherwise ask for 2.7 GB). 50 MP covers any camera photo.
MAX_PIXELS = 50_000_000
# Per-image decode deadline. A 48 MP PNG decodes in ~1 s on this 2-core CPU, a 12 MP JPEG in
# ~0.1 s (draft mode); 5 s is far beyond any honest file.
MAX_DECODE_SECONDS = 5.0
# Progressive JPEGs from libjpeg/mozjpeg have 10–20 scans; 100 leaves room for any encoder
# while bounding the work (each scan revisits every block of the image).
MAX_JPEG_SCANS = 100
# Formats we never open: Pillow renders EPS by running Ghostscript on the file.
REFUSED_FORMATS = frozenset({"EPS"})
# Decode-time reads in 16 KiB blocks (Pillow's default is 64 KiB): a finer deadline check.
_READ_BLOCK = 16 * 1024
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
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageError(UserError):
    """``kind``: empty | too_large | not_image | unsupported | undecodable | too_many_pixels |
    too_slow | unreadable."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 [S,S,3] RGB, S the requested size
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str


class _DeadlineReader(io.BytesIO):
    """The file's bytes, refusing to be read past a deadline: decoders read as they decode,
    so a slow decode stops at its next read (every 16 KiB) instead of running for minutes."""

    def __init__(self, data: bytes, deadline: float):
        super().__init__(data)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise TimeoutError("decode deadline passed")
        return super().read(size)


_allowed_formats: list[str] | None = None


def _pillow() -> Any:
    """Pillow, set up once: its bomb warnings silenced (we decide limits) and our format list."""
    global _allowed_formats
    from PIL import Image

    if _allowed_formats is None:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        # Plugins warn about damaged files ("Corrupt EXIF data"); the file's fate is decided
        # here (decoded or one error line), so their warnings would only be noise on stderr.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        Image.init()
        _allowed_formats = sorted(set(Image.OPEN) - REFUSED_FORMATS)
    return Image


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
        with np.errstate(all="ignore"):  # NaN/inf pixels and ranges near float max: clipped
            arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0, neginf=0)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = np.nan_to_num((arr - lo) / (hi - lo or 1.0) * 255.0 + 0.5)
        grey = np.clip(scaled, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")  # palette transparency becomes alpha
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode == "RGB":
        return im  # convert() would copy (0.3 s for 48 MP)
    # L, 1, CMYK (Pillow inverts Adobe CMYK JPEGs correctly), YCbCr, LAB, HSV, RGBX, ...
    return im.convert("RGB")


def _center_square(im: Any, size: int) -> np.ndarray:
    """PIL RGB image → uint8 ``[size,size,3]``: centred square, Lanczos."""
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        # First an integer box-filter reduction of the square alone to ≥ 96 px (reduce()
        # reads only inside the box: no copy of the crop, nothing from outside it), then
        # Lanczos for the last ≥ 3×: what Pillow's reducing_gap=3 does, 0.1 s instead of
        # 0.85 s for a 6000 px square, pixels within ±1 of a plain Lanczos.
        factor = side // (3 * size)
        im = im.reduce(factor, box=box) if factor >= 2 else im.crop(box)
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy()


def _jpeg_scans(data: bytes) -> int:
    # 0xFF 0xDA (start of scan) cannot occur inside entropy-coded data (0xFF is stuffed as
    # 0xFF00), so counting it over the file counts scans (a thumbnail's scans included).
    return data.count(b"\xff\xda")


def _smallest_adequate_entry(im: Any, size: int) -> None:
    """ICO/ICNS hold several sizes; decode the smallest one that still has ≥ ``size`` px a
    side (cheaper, and all the model needs), not the largest."""
    try:
        sizes = sorted(im.info.get("sizes") or (), key=lambda s: s[0] * s[1])
        for entry in sizes:
            if min(entry[0], entry[1]) >= size:
                im.size = tuple(entry[:2])
                return
    except Exception:  # a size Pillow will not pick: keep its default (still bounded)
        return


def _refuse_pixels(name: str, pixels: int, max_pixels: int) -> ImageError:
    return ImageError(
        "too_many_pixels", f"{name}: {pixels:,} pixels exceeds the limit of {max_pixels:,}"
    )


def _open(data: bytes, name: str, max_pixels: int, deadline: float) -> Any:
    """Header only; raises ImageError. Pillow's bomb check is aligned with ``max_pixels``
    so that nested images (container entries) are held to the same limit."""
    image_module = _pillow()
    from PIL import UnidentifiedImageError

    # DecompressionBombError above 2 × MAX_PIXELS; the warning band below it is
    # silenced. Process-wide, but every caller in a process uses the same limit.
    image_module.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)
    try:
        im = image_module.open(_DeadlineReader(data, deadline), formats=_allowed_formats)
    except UnidentifiedImageError:
        head = data[:256].lstrip().lower()
        if head.startswith((b"<svg", b"<?xml")) or b"<svg" in head:
            raise ImageError(
                "unsupported", f"{name}: SVG is a vector format; convert it to PNG or JPEG first"
            ) from None
        if head.startswith(b"%pdf"):
            raise ImageError(
                "unsupported",
                f"{name}: PDF is not an image; convert its pages to PNG or JPEG first",
            ) from None
        if head.startswith((b"%!ps", b"\xc5\xd0\xd3\xc6")):
            raise ImageError(
                "unsupported",
                f"{name}: PostScript/EPS is refused (it needs Ghostscript to "
                "run the file); convert it to PNG or JPEG first",
            ) from None
        if data.startswith(_IMAGE_MAGIC):
            raise ImageError(
                "undecodable", f"{name}: damaged image header (bad checksum or fields)"
            ) from None
        raise ImageError("not_image", f"{name}: not an image Pillow can read") from None
    if im.format == "JPEG" or im.format == "MPO":
        scans = _jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            im.close()
            raise ImageError(
                "undecodable",
                f"{name}: JPEG with {scans:,} scans (at most {MAX_JPEG_SCANS} are accepted; "
                "normal files have 1–20)",
            )
    return im


def _decode_opened(im: Any, name: str, max_pixels: int, size: int) -> Decoded:
    from PIL import ImageOps

    w, h = im.size
    if w * h > max_pixels:
        raise _refuse_pixels(name, w * h, max_pixels)
    if w < 1 or h < 1:
        raise ImageError("undecodable", f"{name}: image has no pixels ({w}×{h})")
    fmt = im.format or "unknown"
    if fmt in ("ICO", "ICNS"):
        _smallest_adequate_entry(im, size)
    if fmt in ("JPEG", "MPO"):
        im.draft(None, (2 * size, 2 * size))  # shorter side ≥ 2×size: Lanczos has input
    im.decodermaxblock = _READ_BLOCK
    # A freshly opened file is at its first real frame (a PSD's is numbered 1, not 0): no seek.
    im.load()  # decode now, so truncation and CRC errors surface here
    if im.size[0] * im.size[1] > max_pixels:  # a container whose entry lied about its size
        raise _refuse_pixels(name, im.size[0] * im.size[1], max_pixels)
    ImageOps.exif_transpose(im, in_place=True)  # camera orientation, as viewers show it
    rgb = _to_rgb(im)
    shape = rgb.size
    if fmt in ("JPEG", "MPO") and shape != (w, h) and shape != (h, w):
        # draft mode decoded at 1/k scale: report the file's true size, oriented.
        shape = (w, h) if (rgb.size[0] >= rgb.size[1]) == (w >= h) else (h, w)
    return Decoded(_center_square(rgb, size), shape, fmt)


def decode(
    data: bytes,
    name: str = "image",
    *,
    size: int,
    max_pixels: int = MAX_PIXELS,
    max_seconds: float = MAX_DECODE_SECONDS,
) -> Decoded:
    """Bytes of any image Pillow reads → uint8 ``[size,size,3]``; raise :class:`ImageError`."""
    from PIL import Image

    if not data:
        raise ImageError("empty", f"{name}: empty file (0 bytes)")
    deadline = time.monotonic() + max_seconds
    fmt = "image"
    try:
        im = _open(data, name, max_pixels, deadline)
        fmt = im.format or fmt
        with im:
            return _decode_opened(im, name, max_pixels, size)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        m = _PILLOW_PIXELS.search(str(e))
        raise _refuse_pixels(name, int(m.group(1)) if m else max_pixels + 1, max_pixels) from None
    except TimeoutError:
        raise ImageError(
            "too_slow", f"{name}: decoding took over {max_seconds:g} s (the per-image limit)"
        ) from None
    except MemoryError:
        raise ImageError("too_many_pixels", f"{name}: not enough memory to decode it") from None
    except Exception as e:  # any decoder failure is this image's problem, never the batch's
        raise ImageError(
            "undecodable",
            f"{name}: damaged or truncated {fmt} data ({type(e).__name__}: {first_line(e)})",
        ) from None


def from_pil(im: Any, name: str = "image", *, size: int) -> Decoded:
    """An in-memory PIL image → the same ``size``×``size`` RGB form as a decoded file (EXIF
    orientation, mode conversion, centre square, Lanczos)."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.size[0] < 1 or im.size[1] < 1:
        raise ImageError("undecodable", f"{name}: image has no pixels")
    rgb = _to_rgb(im)
    return Decoded(_center_square(rgb, size), rgb.size, im.format or "PIL")


def from_array(array: np.ndarray, name: str = "array", *, size: int) -> Decoded:
    """uint8 ``[H,W,3]`` RGB (or ``[H,W]`` grey) → the same ``size``×``size`` RGB form."""
    from PIL import Image

    a = np.asarray(array)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(
            "unsupported",
            f"{name}: expected uint8 [H,W,3] (RGB), [H,W,4] (RGBA) or [H,W] (grey), "
            f"got {a.dtype} {list(a.shape)}",
        )
    return from_pil(Image.fromarray(a), name, size=size)


def header_pixels(data: bytes, max_pixels: int = MAX_PIXELS) -> int:
    """Width × height from the header alone (0 when it cannot be read): for request budgets.
    A file that fails here fails in :func:`decode` with the proper error."""
    try:
        im = _open(data, "image", max_pixels, time.monotonic() + 1.0)
    except Exception:
        return 0
    with im:
        return im.size[0] * im.size[1]


def read_file(
    path,
    *,
    size: int,
    name: str | None = None,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_seconds: float = MAX_DECODE_SECONDS,
) -> Decoded:
    """Read and decode an image file, with the same limits as the server."""
    from pathlib import Path

    path = Path(path)
    name = printable(str(path) if name is None else name)
    try:
        nbytes = path.stat().st_size
        if nbytes > max_bytes:
            raise ImageError(
                "too_large", f"{name}: {nbytes:,} bytes exceeds the limit of {max_bytes:,}"
            )
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # a file growing meanwhile is still bounded
        if len(data) > max_bytes:
            raise ImageError("too_large", f"{name}: more than {max_bytes:,} bytes")
    except OSError as e:
        raise ImageError("unreadable", f"{name}: cannot read ({e.strerror or e})") from None
    return decode(data, name, size=size, max_pixels=max_pixels, max_seconds=max_seconds)


def without_name(error: str, name: str) -> str:
    """A decoding error's message without its leading "name: " (for reports that print the
    file's name themselves)."""
    prefix = printable(name) + ": "
    return error[len(prefix) :] if error.startswith(prefix) else error


def ignore_interrupts() -> None:
    """A decoding worker's initializer: Ctrl-C reaches every process of the terminal's group;
    the parent stops the work and reports it once, the workers must not each print a
    KeyboardInterrupt traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_many(
    paths: list[str], size: int, names: list[str] | None = None
) -> tuple[np.ndarray, list[tuple[int, int]], list[str]]:
    """Read and decode each file (a worker process's share): uint8 ``[n,size,size,3]`` (zeros
    where a file failed), each image's (width, height) after EXIF orientation ((0, 0) where it
    failed), and per file "" or the reason it failed (named by ``names`` when given).
    Top-level and torch-free, so a spawned worker imports only numpy and Pillow."""
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    sizes, errors = [], []
    for i, path in enumerate(paths):
        try:
            decoded = read_file(path, size=size, name=names[i] if names else None)
            out[i], size_i, error = decoded.pixels, decoded.original_size, ""
        except ImageError as e:
            size_i, error = (0, 0), str(e)
        sizes.append(size_i)
        errors.append(error)
    return out, sizes, errors


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` safe for a terminal and for one line: control characters (escape sequences,
    newlines) become visible escapes (``\\x1b``, ``\\n``), and bytes of a file name that were
    not UTF-8 (surrogate escapes) become ``\\xNN``."""

    def escape(m: re.Match[str]) -> str:
        c = m.group()
        code = ord(c)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of an undecodable byte
            return f"\\x{code - 0xDC00:02x}"
        if c == "\n":
            return "\\n"
        if c == "\t":
            return "\\t"
        if c == "\r":
            return "\\r"
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(escape, text)
