"""Training throughput and peak memory: our pipeline vs the usual tutorial pipeline.

Both train the same model (torchvision ResNet-50, 10 classes, random init) at the same
resolution on the same CIFAR-10 images, alternating in separate child processes (clean peak
RSS per run), several times; the medians and their ratio are printed as a Markdown table.

- tutorial: torchvision.datasets.CIFAR10 + PIL transforms (RandomCrop(32, padding=4),
  RandomHorizontalFlip, Resize(px), ToTensor, Normalize) + DataLoader(num_workers=2,
  shuffle) + fp32, SGD; the loop from the PyTorch CIFAR-10 tutorial.
- ours: ``cifar10_resnet50.training.train.run`` itself (uint8 tensors in memory, batched on-device
  augmentation, preprocessing inside the model, bf16 autocast where the CPU has it,
  channels_last), read from its own metrics.jsonl.

Each run trains 2 epochs over the same ``--images`` images; the second (warm) epoch is timed.
Achieved FLOP/s = FLOPs per training image (counted with torch.utils.flop_counter on one
forward+backward) × img/s, as a fraction of a dense matmul peak measured in this script.

    python benchmarks/train_throughput.py --data-dir ../shared/cifar10 --sizes 32 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_tutorial(data_dir: str, px: int, images: int, batch_size: int) -> dict:
    import torch
    import torchvision
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.transforms as T

    # The local copy was re-encoded (JPEG), so torchvision's md5 checks refuse it; the files
    # have the official layout, which is all its loader needs. Everything else is stock.
    tv_cifar.check_integrity = lambda *args, **kwargs: True

    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.Resize(px),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    ds = torchvision.datasets.CIFAR10(data_dir, train=True, download=False, transform=transform)
    ds = torch.utils.data.Subset(ds, range(images))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    seconds = 0.0
    for _epoch in range(2):
        t0 = time.perf_counter()
        seen = 0
        for x, y in loader:
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            seen += len(y)
        seconds = time.perf_counter() - t0
    return {"img_per_s": seen / seconds}


def run_ours(data_dir: str, px: int, images: int, batch_size: int, compile_: bool) -> dict:
    from cifar10_resnet50 import config
    from cifar10_resnet50.training import train

    with tempfile.TemporaryDirectory() as out:
        cfg = config.override(
            config.Config(),
            {
                "data.data_dir": data_dir,
                "data.download": False,
                "data.val_size": 0,
                "data.subset": images,
                "model.weights": "none",
                "model.image_size": px,
                "train.epochs": 2,
                "train.batch_size": batch_size,
                "train.progress": False,
                "train.compile": compile_,
                "train.out": out + "/run",
            },
        )
        train.run(cfg, final_eval=False)
        lines = Path(out, "run", "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
    return {"img_per_s": rows[-1]["img_per_s"]}


def child(args: argparse.Namespace) -> None:
    if args.child == "tutorial":
        result = run_tutorial(args.data_dir, args.px, args.images, args.batch_size)
    else:
        result = run_ours(
            args.data_dir, args.px, args.images, args.batch_size, args.child == "ours+compile"
        )
    # ru_maxrss is in KiB on Linux; children (DataLoader workers) counted separately.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["workers_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def flops_per_train_image(px: int) -> float:
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.resnet50(num_classes=10)
    x = torch.randn(2, 3, px, px)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def matmul_peak(dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times)


def spawn(pipeline: str, px: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        pipeline,
        "--px",
        str(px),
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
        "--data-dir",
        args.data_dir,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{pipeline} at {px}px failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument(
        "--images", type=int, default=1280, help="images per epoch (2 epochs, the 2nd timed)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure ours with --compile")
    p.add_argument("--child", choices=("tutorial", "ours", "ours+compile"), help=argparse.SUPPRESS)
    p.add_argument("--px", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import torch

    pipelines = ["tutorial", "ours"] + (["ours+compile"] if args.compile else [])
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"# matmul peak (2048², median of 5): fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s"
    )
    print(
        f"# {args.images} images/epoch, batch {args.batch_size}, 2nd epoch timed, "
        f"median of {args.repeats} alternating runs\n"
    )
    print(
        "| px | pipeline | img/s (median) | runs | peak RSS MiB | worker peak RSS MiB (largest) "
        "| ×tutorial | GFLOP/s | % of matmul peak |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for px in args.sizes:
        runs: dict[str, list[dict]] = {k: [] for k in pipelines}
        for _ in range(args.repeats):
            for pipe in pipelines:
                runs[pipe].append(spawn(pipe, px, args))
        flops = flops_per_train_image(px)
        base = statistics.median(r["img_per_s"] for r in runs["tutorial"])
        for pipe in pipelines:
            rates = [r["img_per_s"] for r in runs[pipe]]
            med = statistics.median(rates)
            rss = max(r["peak_rss_mib"] for r in runs[pipe])
            # DataLoader workers are forked: their RSS counts pages shared with the parent too.
            # Ours has no workers (RUSAGE_CHILDREN would only show an `ldconfig -p` fork).
            workers = (
                max(r["workers_peak_rss_mib"] for r in runs[pipe]) if pipe == "tutorial" else None
            )
            peak = peaks["float32"] if pipe == "tutorial" else peaks["bfloat16"]
            achieved = flops * med
            print(
                f"| {px} | {pipe} | {med:.0f} | {', '.join(f'{r:.0f}' for r in rates)} | "
                f"{rss:.0f} | {'–' if workers is None else f'{workers:.0f}'} | {med / base:.2f} | {achieved / 1e9:.0f} | "
                f"{100 * achieved / peak:.0f}% ({'fp32' if pipe == 'tutorial' else 'bf16'}) |"
            )
    print(
        "\n# FLOPs per training image (fwd+bwd): "
        + ", ".join(f"{px}px {flops_per_train_image(px) / 1e9:.2f} GFLOP" for px in args.sizes)
    )


if __name__ == "__main__":
    main()
