"""EMA on/off and TrivialAugment on/off at the first-hour scale (issue 21, req. 8): from
scratch, 32 px, the full training set, a few epochs, on this CPU.

One run per augmentation arm, each with --ema: the run's last.pt holds both the trained
weights (EMA off) and the averaged ones (EMA on), so the EMA comparison is paired within a
run. Every model is scored on all 10,000 test images; the confidence intervals are paired
bootstrap intervals over the test images (95 %, 2,000 resamples): they cover the test set's
sampling, not the variation between training seeds (one seed per arm here; say so).

    .venv/bin/python benchmarks/ema_trivial.py --out /tmp/ema_trivial [--epochs 3] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ARMS = {"crop+flip": "none", "crop+flip+TrivialAugment": "trivial"}


def train(out: Path, policy: str, epochs: int, seed: int, ema: float) -> float:
    cmd = [
        sys.executable, "-m", "cifar10_resnet50", "train", "--weights", "none",
        "--image-size", "32", "--epochs", str(epochs), "--optimizer", "adamw", "--lr", "2e-3",
        "--ema", str(ema), "--augment", policy, "--seed", str(seed), "--out", str(out),
        "--no-progress", "--no-tensorboard", "--test-images", "100",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def correct(last: Path, weights_key: str) -> np.ndarray:
    """Per test image: 1 if the model (``model`` or the EMA's weights) is right."""
    from cifar10_resnet50 import checkpoint, data
    from cifar10_resnet50.evaluation import evaluate
    from cifar10_resnet50.model import from_meta

    blob = checkpoint.load(last)
    model = from_meta(blob["model_meta"])
    weights = blob["model"] if weights_key == "model" else blob["train_state"]["ema"]["weights"]
    model.load_state_dict(weights)
    arrays = data.load("cifar10", data_dir=blob["config"]["data"]["data_dir"], download=False)
    logits = evaluate.predict_logits(
        model, arrays.test_x, batch_size=500, device=torch.device("cpu"),
        amp_dtype=torch.bfloat16,
    )  # fmt: skip
    return (logits.argmax(1) == arrays.test_y).numpy().astype(np.float64)


def paired_ci(a: np.ndarray, b: np.ndarray, n: int = 2000) -> tuple[float, float, float]:
    """Mean of b − a in points with its 95 % bootstrap interval over the test images."""
    rng = np.random.default_rng(0)
    diff = b - a
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(1)
    return 100 * diff.mean(), 100 * np.percentile(means, 2.5), 100 * np.percentile(means, 97.5)


def acc_ci(a: np.ndarray, n: int = 2000) -> str:
    rng = np.random.default_rng(1)
    means = a[rng.integers(0, len(a), size=(n, len(a)))].mean(1)
    return f"{100 * a.mean():.2f} % ({100 * np.percentile(means, 2.5):.2f}–{100 * np.percentile(means, 97.5):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--ema", type=float, default=0.999)
    args = ap.parse_args()
    results = {}
    for seed in args.seeds:
        for arm, policy in ARMS.items():
            run = args.out / f"{policy}-seed{seed}"
            seconds = None
            if not (run / "last.pt").exists():
                seconds = train(run, policy, args.epochs, seed, args.ema)
            for key, label in (("model", "EMA off"), ("ema", "EMA on")):
                results[(seed, arm, label)] = correct(run / "last.pt", key)
            print(f"seed {seed} {arm}: trained in {seconds} s", flush=True)
    lines = ["| seed | augmentation | EMA | test accuracy (95 % CI) |", "|---|---|---|---|"]
    for (seed, arm, label), c in results.items():
        lines.append(f"| {seed} | {arm} | {label} | {acc_ci(c)} |")
    lines += ["", "| seed | comparison | difference, points (95 % CI) |", "|---|---|---|"]
    arms = list(ARMS)
    for seed in args.seeds:
        for arm in arms:
            d = paired_ci(results[(seed, arm, "EMA off")], results[(seed, arm, "EMA on")])
            lines.append(
                f"| {seed} | EMA on − off ({arm}) | {d[0]:+.2f} ({d[1]:+.2f} to {d[2]:+.2f}) |"
            )
        for label in ("EMA off", "EMA on"):
            d = paired_ci(results[(seed, arms[0], label)], results[(seed, arms[1], label)])
            lines.append(
                f"| {seed} | TrivialAugment on − off ({label}) | {d[0]:+.2f} ({d[1]:+.2f} to {d[2]:+.2f}) |"
            )
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    summary = {f"{s}|{a}|{e}": float(c.mean()) for (s, a, e), c in results.items()}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
