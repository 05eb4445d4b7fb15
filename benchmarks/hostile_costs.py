"""What hostile or huge inputs cost now, and what the tensor cache's checksum costs.

    python benchmarks/hostile_costs.py --data-dir ../shared/cifar10

Prints medians of 5 (3 for the big images) in seconds:
- tensor cache: a cached ``cifar10.load`` in all, and the sha256 of its 184 MB alone;
- decoding: a 48 MP PNG and a 48 MP JPEG (draft mode) through ``images.decode``;
- refusals: a progressive JPEG with 10,000 repeated scans (took 137 s before), an ICO whose
  entry holds a 13000×13000 PNG (+563 MB before), a 144 MP PNG header.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

from cifar10_resnet50.data import cifar10

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def refused(fn) -> None:
    from cifar10_resnet50 import images

    try:
        fn()
    except images.ImageError:
        return
    raise AssertionError("expected a refusal")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    from cifar10_resnet50 import data, images
    from corpus import huge_header_png
    from test_hostile import _ico_holding, _repeat_last_scan

    root = cifar10.resolve_data_dir(args.data_dir)
    cifar10.load(root)  # build the cache once
    arrays = cifar10.load(root)
    rows = [
        ("tensor cache: cached cifar10.load in all", median_time(lambda: cifar10.load(root))),
        (
            "tensor cache: sha256 of the 184 MB alone",
            median_time(lambda: data.content_digest(arrays)),
        ),
    ]
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (60, 80, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    photo = (
        (photo.astype(np.int16) + rng.integers(-8, 8, photo.shape)).clip(0, 255).astype(np.uint8)
    )
    for fmt, kw in (("PNG", {"compress_level": 1}), ("JPEG", {"quality": 90})):
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, fmt, **kw)
        blob = buf.getvalue()
        t = median_time(lambda blob=blob: images.decode(blob, "x", max_seconds=60, size=32), 3)
        rows.append((f"decode a 48 MP {fmt} ({len(blob) / 1e6:.0f} MB)", t))
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (9, 99, 199)).save(buf, "JPEG", progressive=True)
    scans = _repeat_last_scan(buf.getvalue(), 10_000)
    rows.append(
        (
            "refuse a 49 MP progressive JPEG with 10,000 scans",
            median_time(lambda: refused(lambda: images.decode(scans, "s", size=32))),
        )
    )
    ico = _ico_holding(huge_header_png(13000, 13000))
    rows.append(
        (
            "refuse an ICO holding a 13000×13000 PNG",
            median_time(lambda: refused(lambda: images.decode(ico, "i", size=32))),
        )
    )
    big = huge_header_png(12000, 12000)
    rows.append(
        (
            "refuse a 144 MP PNG header",
            median_time(lambda: refused(lambda: images.decode(big, "b", size=32))),
        )
    )
    print("| what | seconds (median) |\n|---|---:|")
    for what, t in rows:
        print(f"| {what} | {t:.3f} |")


if __name__ == "__main__":
    main()
