"""Bulk prediction (issue 20): the model alone vs ``predict`` before vs ``predict`` now, side by
side, for a checkpoint (fp32 and bf16) and its int8 ONNX export; decoding with 1 and 2 worker
processes; peak memory of the ``predict`` command for a small and a large folder.

Photos: ``--images`` CIFAR-10 test images upscaled to 256×256 (bicubic) and saved as JPEG
(quality 90), the kind of file a bulk job reads. The model: a random-init ResNet-50 at
``--size`` px, taking CIFAR-10's 32 px images (speed does not depend on the weights). Each configuration runs ``--repeats``
times, interleaved, and the median img/s is reported.

* model alone: ``Predictor.probabilities`` on already decoded arrays (the ceiling);
* before: ``workers=0``, the loop ``predict`` had before issue 20 (decode a batch's files one
  by one in this process, then run the model; nothing overlaps);
* now: the same files through ``bulk.run`` (worker processes decoding ahead of the model,
  results streamed to a jsonl file), for each ``--workers`` and model threads.

    python benchmarks/predict_bulk.py --images 5000 --size 64 --repeats 3
    python benchmarks/predict_bulk.py --rss-only          # peak RSS for 1,000 and 20,000 files
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cifar10_resnet50.decode_pool import decode_in_order, usable_cores


def write_photos(root: Path, n: int, data_dir: str | None) -> list[Path]:
    from PIL import Image

    from cifar10_resnet50.data import cifar10

    arrays = cifar10.load(cifar10.resolve_data_dir(data_dir))
    paths = []
    for i in range(n):
        j = i % len(arrays.test_y)
        path = root / f"{i // 1000:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(arrays.test_x[j].permute(1, 2, 0).numpy())
        im.resize((256, 256), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def write_tiny_pngs(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(buf, "PNG")
    for i in range(n):
        path = root / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())  # same pixels, distinct files


def save_checkpoint(path: Path, size: int) -> Path:
    """A random-init CIFAR-10 ResNet-50 running at ``size`` px in our checkpoint format (as
    tests build one): it takes 32 px images (the data's stored size) and resizes them inside."""
    import torch

    from cifar10_resnet50 import checkpoint
    from cifar10_resnet50 import model as M
    from cifar10_resnet50.data.cifar10 import CLASSES

    torch.manual_seed(0)
    net = M.build("none", size, 10)
    meta = M.model_meta("none", size, CLASSES, 32)
    checkpoint.save(path, {"model_meta": meta, "model": net.state_dict(), "config": {}})
    return path


def make_models(folder: Path, size: int, data_dir: str | None) -> dict[str, Path]:
    from cifar10_resnet50.serving import export

    ckpt = save_checkpoint(folder / "best.pt", size)
    onnx = folder / "best.int8.onnx"
    export.run(str(ckpt), "onnx", int8=True, out=str(onnx), data_dir=data_dir, parity_images=500)
    return {"checkpoint fp32": ckpt, "checkpoint bf16": ckpt, "onnx int8": onnx}


def load(path: Path, label: str, threads: int, batch: int, workers: int | None):
    """As ``predict`` loads it: ONNX Runtime's threads sleep instead of spinning when decoding
    processes share the cores (``busy_wait``)."""
    from cifar10_resnet50.serving import inference

    precision = "bf16" if "bf16" in label else "fp32"
    return inference.load(path, precision=precision, threads=threads, batch_size=batch,
                          busy_wait=not workers)  # fmt: skip


def rate_model_alone(predictor, pixels: np.ndarray) -> float:
    t0 = time.perf_counter()
    predictor.probabilities(pixels)
    return len(pixels) / (time.perf_counter() - t0)


def rate_predict(predictor, paths: list[Path], workers: int, out: Path) -> float:
    from cifar10_resnet50.serving import bulk

    summary = bulk.run(predictor, [str(paths[0].parent.parent)], top_k=3, fmt="jsonl",
                       output=str(out), workers=workers, on_rejected=print)  # fmt: skip
    assert summary.predicted == len(paths), summary
    return summary.files / summary.seconds


def rate_decode(paths: list[Path], size: int, workers: int, batch: int) -> float:
    chunks = (([str(p) for p in paths[i : i + batch]], None) for i in range(0, len(paths), batch))
    t0 = time.perf_counter()
    n = sum(len(errors) for _, _, errors in decode_in_order(chunks, size, workers))
    return n / (time.perf_counter() - t0)


def throughput(args: argparse.Namespace, root: Path) -> None:
    import torch

    from cifar10_resnet50.images import decode_many

    t0 = time.perf_counter()
    paths = write_photos(root / "photos", args.images, args.data_dir)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"wrote {len(paths):,} JPEGs 256×256 ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    cores = usable_cores()
    print(f"cores: {cores}; torch {torch.__version__}")
    models = make_models(root, args.size, args.data_dir)
    size = 32  # the models' input size: CIFAR-10's, the images they take before resizing
    pixels = decode_many([str(p) for p in paths], size)[0]
    decode_rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for w in decode_rates:
            decode_rates[w].append(rate_decode(paths, size, w, args.batch))
    one, two = (statistics.median(decode_rates[w]) for w in (1, 2))
    print(f"decoding only, 256 px JPEG → {size} px: 1 worker {one:,.0f} img/s, 2 workers {two:,.0f} "
          f"img/s ({two / one:.2f}×)")  # fmt: skip
    rows = []
    for label, path in models.items():
        if args.models and label not in args.models:
            continue
        configs = [("model alone", cores, None), ("before (workers=0)", cores, 0)]
        configs += [(f"now (workers={w}, threads={t})", t, w) for w, t in args.configs]
        rates: dict[str, list[float]] = {c[0]: [] for c in configs}
        for _ in range(args.repeats):
            for name, threads, workers in configs:
                predictor = load(path, label, threads, args.batch, workers)
                if workers is None:
                    rates[name].append(rate_model_alone(predictor, pixels))
                else:
                    rates[name].append(rate_predict(predictor, paths, workers, root / "o.jsonl"))
        alone = statistics.median(rates["model alone"])
        for name, _, _ in configs:
            median = statistics.median(rates[name])
            rows.append((label, name, median, median / alone, rates[name]))
            print(f"{label:<16} {name:<32} {median:>7,.0f} img/s  {median / alone:>5.0%} of alone"
                  f"  runs {[round(r) for r in rates[name]]}")  # fmt: skip
    (root / "rows.json").write_text(json.dumps(rows))


def peak_rss(root: Path, n: int, model: Path) -> tuple[float, float]:
    folder = root / f"tiny{n}"
    write_tiny_pngs(folder, n)
    out = root / f"tiny{n}.jsonl"
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so a child
    # started by this (large) script would report this script's peak.
    code = (
        "import re, sys; from cifar10_resnet50.cli import main; rc = main(sys.argv[1:]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print('RSS', hwm, file=sys.stderr); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, "predict", str(model), str(folder), "--format", "jsonl",
         "--output", str(out), "--batch-size", "64"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    rss_kb = int(done.stderr.split("RSS ")[1].split()[0])
    assert out.read_bytes().count(b"\n") == n
    return rss_kb / 1024, seconds


def rss(args: argparse.Namespace, root: Path) -> None:
    ckpt = save_checkpoint(root / "tiny.pt", 32)
    for n in args.rss_files:
        mib, seconds = peak_rss(root, n, ckpt)
        print(f"predict {n:>7,} files → jsonl: peak RSS of the command {mib:,.0f} MiB "
              f"({seconds:.0f} s)")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--size", type=int, default=64, help="the model's input size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", help="CIFAR-10 (default $CIFAR10_DATA_DIR)")
    p.add_argument("--rss-files", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--rss-only", action="store_true")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--models", nargs="+", choices=["checkpoint fp32", "checkpoint bf16",
                   "onnx int8"], help="only these (default: all)")  # fmt: skip
    args = p.parse_args()
    cores = usable_cores()
    # (workers, model threads): one worker beside a model on every core (the default), and
    # the cores split between them.
    args.configs = [(1, cores)] + ([(1, cores - 1)] if cores > 1 else [])
    with tempfile.TemporaryDirectory(prefix="predict-bulk-") as tmp:
        root = Path(tmp)
        if not args.rss_only:
            throughput(args, root)
        if not args.no_rss:
            rss(args, root)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this script: {peak:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
