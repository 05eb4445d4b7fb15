"""Issue 8, requirement 9: the corruption sweep's time on this CPU and the robustness table of
a model trained here, fp32 checkpoint against its int8 ONNX export.

    python benchmarks/robustness_bench.py RUN/best.pt [--images 2000]

Runs ``evaluate MODEL --corruptions --corruption-images N`` on the checkpoint, exports it to
int8 ONNX, and runs the same on the export; prints the sweep time, clean and mean corruption
accuracy, relative drop, ECE, and the per-group accuracies.
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
from cifar10_resnet50.evaluation.corruptions import GROUPS  # noqa: E402  (no torch work at import)


def cli(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cifar10_resnet50", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "model.int8.onnx"
        cli("export", args.checkpoint, "--format", "onnx", "--int8", "--out", str(onnx),
            "--data-dir", args.data_dir)  # fmt: skip
        for name, model in (
            ("fp32 checkpoint (bf16 autocast)", args.checkpoint),
            ("int8 ONNX", str(onnx)),
        ):
            out = Path(tmp) / name.split()[0]
            seconds = cli("evaluate", model, "--corruptions", "--corruption-images",
                          str(args.images), "--out", str(out), "--data-dir", args.data_dir)  # fmt: skip
            sweep = json.loads((out / "robustness.json").read_text())
            clean = json.loads((out / "metrics.json").read_text())
            rows.append((name, seconds, sweep, clean))
    print(f"| model | evaluate --corruptions ({args.images} images) | sweep alone | clean (test set) | "
          "clean (sweep subset) | mean corruption acc. | relative drop | ECE | "
          + " | ".join(GROUPS) + " |")  # fmt: skip
    print("|---" * (8 + len(GROUPS)) + "|")
    for name, seconds, sweep, clean in rows:
        groups = [
            sum(sweep["per_corruption"][c] for c in names) / len(names) for names in GROUPS.values()
        ]
        print(
            f"| {name} | {seconds:.0f} s | {sweep['seconds']:.0f} s | "
            f"{100 * clean['accuracy']:.2f} % | {100 * sweep['clean_accuracy']:.2f} % | "
            f"{100 * sweep['mean_corruption_accuracy']:.2f} % | "
            f"{100 * sweep['relative_drop']:.1f} % | {100 * clean['calibration']['ece']:.2f} % | "
            + " | ".join(f"{100 * g:.1f} %" for g in groups)
            + " |"
        )
    print()
    for name, _, sweep, _ in rows:
        print(
            name,
            json.dumps({k: [round(100 * a, 1) for a in v] for k, v in sweep["accuracy"].items()}),
        )


if __name__ == "__main__":
    main()
