"""The distributed path on a CPU: 1 process × batch 2B against torchrun 2 processes × B (the
same global batch, --sync-bn, gloo), each with all cores between them, alternating, several
times. Prints img/s of the warm epoch, the ratio, and how far the two runs' final weights and
losses are apart (they see the same images, crops and statistics; only float summation order
differs; in bf16, the default here, rounding differs with the batch shape and the runs drift
apart over epochs, so the exact check is the fp32 test in tests/test_distributed.py).

    python benchmarks/distributed_cpu.py --data-dir ../shared/cifar10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(data_dir: str, nproc: int, batch: int, images: int, out: Path) -> list[dict]:
    cores = os.cpu_count() or 1
    args = ["-m", "cifar10_resnet50", "train", "--data-dir", data_dir, "--weights", "none",
            "--image-size", "32", "--subset", str(images), "--val-size", "1000", "--epochs", "2",
            "--batch-size", str(batch), "--optimizer", "adamw", "--lr", "2e-3", "--device",
            "cpu", "--no-progress", "--no-tensorboard", "--sync-bn",
            "--threads", str(max(1, cores // nproc)), "--out", str(out)]  # fmt: skip
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": str(max(1, cores // nproc)),
    }
    subprocess.run([sys.executable, *args], check=True, env=env, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from cifar10_resnet50 import checkpoint

    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        outs = {}
        for nproc in (1, 2):
            out = Path(tempfile.mkdtemp()) / "run"
            rows = run(args.data_dir, nproc, args.batch // nproc, args.images, out)
            rates[nproc].append(rows[-1]["img_per_s"])
            outs[nproc] = (out, rows)
    a = checkpoint.load(outs[1][0] / "last.pt")["model"]
    b = checkpoint.load(outs[2][0] / "last.pt")["model"]
    params = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    diff = max(
        float((a[k].float() - b[k].float()).abs().max() / (a[k].float().abs().max() + 1e-12))
        for k in params
    )
    loss_gap = max(
        abs(r1["train_loss"] - r2["train_loss"])
        for r1, r2 in zip(outs[1][1], outs[2][1], strict=True)
    )
    m1, m2 = statistics.median(rates[1]), statistics.median(rates[2])
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {args.images} images at 32 px, "
        f"global batch {args.batch}, 2 epochs (the second timed), {args.repeats} repeats"
    )
    print("| processes | img/s (median) | runs |\n|---:|---:|---|")
    print(f"| 1 × {args.batch} | {m1:.0f} | {', '.join(f'{r:.0f}' for r in rates[1])} |")
    print(
        f"| 2 × {args.batch // 2} (torchrun, gloo, --sync-bn) | {m2:.0f} | "
        f"{', '.join(f'{r:.0f}' for r in rates[2])} |"
    )
    print(
        f"ratio 2 ÷ 1: {m2 / m1:.2f}×; final parameters max |Δ| / max |w| {diff:.2e}; "
        f"epoch train-loss gap {loss_gap:.2e}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
