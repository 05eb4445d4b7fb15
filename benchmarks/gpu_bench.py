"""GPU benchmark (issue 6): our defaults against the tutorial pipeline with AMP, on real pixels.

In one invocation on the GPU machine (no network needed):

1. the model-only training step at 160 px, batch 512, eager and compiled (``gpu_check``);
2. the real ``cifar10-resnet50 train`` command for 2 epochs with the GPU defaults (batch 512,
   160 px, bf16, channels_last, ``--compile auto``), img/s of the warm epoch and wall time;
3. the usual tutorial pipeline with AMP: torchvision ``CIFAR10`` + PIL transforms (RandomCrop,
   flip, ``Resize(160)``, ToTensor, Normalize) + ``DataLoader(all CPU cores, pin_memory)`` +
   bf16 autocast + channels_last, at batch 128, 256 and 512 (its best is the baseline);
4. with several GPUs: ``torchrun --nproc-per-node N`` for 1 epoch, and the scaling;
5. with ``--full-recipe``: the default 10-epoch recipe's whole command.

Prints a Markdown table with img/s and the ratio ours ÷ best tutorial. ``--weights none``
throughout (the machine has no network; throughput does not depend on the weights).

    python benchmarks/gpu_bench.py --data-dir DIR              # on the GPU machine
    python benchmarks/gpu_bench.py --data-dir DIR --smoke      # a minute on a CPU: wiring only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tutorial_amp(data_dir: str, px: int, batch: int, images: int, device: str) -> float:
    """img/s of the second (warm) epoch of the tutorial pipeline with bf16 autocast."""
    import torch
    import torchvision
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.transforms as T

    tv_cifar.check_integrity = lambda *a, **k: True  # re-encoded copy: md5s differ by design
    transform = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.Resize(px), T.ToTensor(),
         T.Normalize(MEAN, STD)]
    )  # fmt: skip
    ds = torchvision.datasets.CIFAR10(data_dir, train=True, download=False, transform=transform)
    ds = torch.utils.data.Subset(ds, range(images))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=os.cpu_count() or 1,
        pin_memory=device == "cuda", drop_last=True, persistent_workers=True,
    )  # fmt: skip
    model = torchvision.models.resnet50(num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rate = 0.0
    for _ in range(2):
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - t0)
    return rate


def ours(data_dir: str, extra: list[str], nproc: int = 1) -> tuple[float, float, list[dict]]:
    """(warm-epoch img/s, wall seconds, metrics rows) of the real train command."""
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = ["-m", "cifar10_resnet50", "train", "--data-dir", data_dir, "--weights", "none",
           "--no-progress", "--out", str(out), *extra]  # fmt: skip
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, *cmd], check=True, env=env)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["img_per_s"], wall, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (wiring check)")
    p.add_argument("--full-recipe", action="store_true", help="also time the 10-epoch default")
    args = p.parse_args()

    import torch

    from gpu_check import measure

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    px, images = (160, 50000) if cuda else (32, 512)
    batches = (128, 256, 512) if cuda else (32,)
    small = [] if cuda else ["--image-size", "32", "--subset", "512", "--batch-size", "32",
                             "--val-size", "64", "--device", "cpu"]  # fmt: skip
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device {name} × {torch.cuda.device_count() if cuda else 1}; torch {torch.__version__}")
    rows = []
    for compiled in (False, True):
        train_rate, _ = measure(torch.device(device), px, compiled, 512 if cuda else 16,
                                30 if cuda else 2, 5 if cuda else 1)  # fmt: skip
        rows.append((f"model step only, batch {512 if cuda else 16}, "
                     f"{'compiled' if compiled else 'eager'}", train_rate))  # fmt: skip
    rate, wall, _ = ours(args.data_dir, ["--epochs", "2", *small])
    rows.append((f"`train` defaults, 2 epochs (wall {wall:.0f} s)", rate))
    tutorial = {b: tutorial_amp(args.data_dir, px, b, images, device) for b in batches}
    best_batch = max(tutorial, key=tutorial.get)
    for b, r in tutorial.items():
        rows.append((f"tutorial + AMP, batch {b}", r))
    gpus = torch.cuda.device_count() if cuda else 1
    if gpus > 1:
        multi, _, _ = ours(args.data_dir, ["--epochs", "1"], nproc=gpus)
        rows.append((f"`train` with torchrun × {gpus} GPUs, 1 epoch", multi))
    if args.full_recipe:
        _, full_wall, full_rows = ours(args.data_dir, small)
        rows.append(
            (
                f"default 10-epoch recipe: whole command {full_wall:.0f} s",
                full_rows[-1]["img_per_s"],
            )
        )
    print("\n| what | train img/s |\n|---|---:|")
    for what, r in rows:
        print(f"| {what} | {r:,.0f} |")
    print(f"\nours ÷ best tutorial+AMP (batch {best_batch}): {rate / tutorial[best_batch]:.2f}×")
    if gpus > 1:
        print(f"scaling {gpus} GPUs: {multi / rate:.2f}× one GPU")


if __name__ == "__main__":
    main()
