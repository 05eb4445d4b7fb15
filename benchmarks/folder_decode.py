"""Decoding a folder of photos into the uint8 tensor cache: all cores vs one (issue 9).

Writes ``--images`` photo-like JPEGs (CIFAR-10 test images upscaled to 640×480 with bicubic
filtering, quality 90: the size and encoding of typical phone/web photos after export; about
60 KB each) into class folders once, then decodes the folder with ``folder.decode_all`` at
each ``--store-size``, with 1 worker and with every core, ``--repeats`` times each, alternating
(one, all, one, all, ...) so that drift on a shared machine hits both alike. Prints medians
and the ratio. No tensor cache is involved: ``decode_all`` is the part that the cache saves.

    python benchmarks/folder_decode.py --images 10000 --store-size 64 160 --repeats 3
    python benchmarks/folder_decode.py --keep /tmp/photos   # keep the folder for a train run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cifar10_resnet50.data import cifar10, folder
from cifar10_resnet50.decode_pool import usable_cores


def write_photos(root: Path, n: int, data_dir: str | None) -> list[str]:
    from PIL import Image

    arrays = cifar10.load(cifar10.resolve_data_dir(data_dir))
    names = []
    for i in range(n):
        j = i % len(arrays.test_y)
        label = arrays.classes[int(arrays.test_y[j])]
        (root / label).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(arrays.test_x[j].permute(1, 2, 0).numpy())
        im = im.resize((640, 480), Image.Resampling.BICUBIC)
        name = f"{label}/{i:05d}.jpg"
        im.save(root / name, quality=90)
        names.append(name)
    return names


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--store-size", type=int, nargs="+", default=[64, 160])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", help="CIFAR-10 (default $CIFAR10_DATA_DIR)")
    p.add_argument("--keep", metavar="DIR", help="write the photos here and keep them")
    args = p.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="photos-"))
    t0 = time.perf_counter()
    names = write_photos(root, args.images, args.data_dir)
    mb = sum((root / n).stat().st_size for n in names) / 1e6
    print(f"wrote {len(names)} JPEGs 640×480 ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    workers = usable_cores()
    print(f"cores available: {workers}")
    for size in args.store_size:
        rates: dict[int, list[float]] = {1: [], workers: []}
        for _ in range(args.repeats):
            for w in (1, workers):
                t0 = time.perf_counter()
                x, errors = folder.decode_all(root, names, size, w, progress=False)
                seconds = time.perf_counter() - t0
                assert not any(errors) and x.shape == (len(names), size, size, 3)
                rates[w].append(len(names) / seconds)
        one, every = statistics.median(rates[1]), statistics.median(rates[workers])
        print(
            f"store {size:>3} px: 1 worker {one:,.0f} img/s, {workers} workers {every:,.0f} img/s "
            f"({every / one:.2f}×); {len(names):,} photos in {len(names) / every:.0f} s "
            f"(runs: {[round(r) for r in rates[1]]} / {[round(r) for r in rates[workers]]})"
        )
    if not args.keep:
        import shutil

        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
