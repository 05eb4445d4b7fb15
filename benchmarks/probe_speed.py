"""Issue 7, requirement 4: the cached linear probe against the per-epoch linear strategy it
replaced, on the full training set at 64 px, from scratch (ImageNet weights cannot be
downloaded in this workplace), same seed and weights, each the whole ``train`` command.

    python benchmarks/probe_speed.py [--old COMMIT] [--subset N] [--epochs 10]

Runs, one after the other on this machine:
  1. the cached probe with an empty feature cache (features computed, then the head fitted);
  2. the cached probe again (features from the cache: the head fit alone);
  3. the per-epoch linear strategy as it was at ``--old`` (a ``git worktree`` of that commit):
     10 epochs of forward passes through the frozen backbone, head trained by SGD.
Prints wall time and test accuracy of each and the ratios.
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
OLD = "ae66bc4"  # the last commit with the per-epoch linear strategy


def run(src: Path, out: Path, cache: Path, args: argparse.Namespace) -> tuple[float, float]:
    command = [
        sys.executable, "-m", "cifar10_resnet50", "train", "--strategy", "linear",
        "--weights", "none", "--image-size", "64", "--epochs", str(args.epochs),
        "--no-progress", "--out", str(out), "--data-dir", args.data_dir,
    ]  # fmt: skip
    if args.subset:
        command += ["--subset", str(args.subset)]
    env = {**os.environ, "PYTHONPATH": str(src), "CIFAR10_RESNET50_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    accuracy = json.loads((out / "eval" / "metrics.json").read_text())["accuracy"]
    return seconds, accuracy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", default=OLD)
    p.add_argument("--subset", type=int)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        old = tmp_path / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old),
                        args.old], check=True)  # fmt: skip
        try:
            cache = tmp_path / "cache"
            rows = [
                ("cached probe, empty cache", run(ROOT / "src", tmp_path / "a", cache, args)),
                ("cached probe, features cached", run(ROOT / "src", tmp_path / "b", cache, args)),
                (f"per-epoch linear ({args.old})", run(old / "src", tmp_path / "c", cache, args)),
            ]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
    base = rows[2][1]
    print("| strategy linear | whole command | vs per-epoch | test accuracy |")
    print("|---|---:|---:|---:|")
    for name, (seconds, acc) in rows:
        print(f"| {name} | {seconds:.0f} s | {base[0] / seconds:.1f}× | {100 * acc:.2f} % |")


if __name__ == "__main__":
    main()
