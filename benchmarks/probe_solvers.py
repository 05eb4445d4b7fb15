"""Issue 7, requirement 2: the linear probe's head fitted by full-batch L-BFGS against AdamW
epochs over the same cached features (64 px, from scratch, the full training set).

    python benchmarks/probe_solvers.py [--subset N] [--cache DIR] [--probe-mirrors]

The first run computes the features (kept in --cache, default a temporary folder); each run's
fit time is the head's alone (``probe.fit_seconds`` in metrics.jsonl), over the same L2 grid.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subset", type=int)
    p.add_argument("--cache")
    p.add_argument("--probe-mirrors", action="store_true")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or str(Path(tmp) / "cache")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CIFAR10_RESNET50_CACHE": cache}
        print("| solver | head fit | validation accuracy | test accuracy | chosen L2 |")
        print("|---|---:|---:|---:|---:|")
        for solver in ("lbfgs", "adamw"):
            out = Path(tmp) / solver
            command = [
                sys.executable, "-m", "cifar10_resnet50", "train", "--strategy", "linear",
                "--weights", "none", "--image-size", "64", "--probe-solver", solver,
                "--no-progress", "--out", str(out), "--data-dir", args.data_dir,
            ]  # fmt: skip
            if args.probe_mirrors:
                command.append("--probe-mirrors")
            if args.subset:
                command += ["--subset", str(args.subset)]
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            test = json.loads((out / "eval" / "metrics.json").read_text())["accuracy"]
            print(
                f"| {solver} | {row['probe']['fit_seconds']:.1f} s | "
                f"{100 * row['val_acc']:.2f} % | {100 * test:.2f} % | {row['probe']['l2']:g} |"
            )


if __name__ == "__main__":
    main()
