"""Issue 7, requirements 5, 7 and 9: budgeted runs on this machine, planned against actual, and
progressive resizing against a fixed resolution at equal wall-clock time.

    python benchmarks/budget_runs.py 3m 5m 5m:progressive 10m [--keep DIR] [-- train flags]

Each argument is a budget, optionally ``:progressive``. Every run is from scratch (ImageNet
weights cannot be downloaded in this workplace) with the from-scratch recipe the README
recommends (AdamW, lr 2e-3), the resolution left to the planner, full data. The wall time
is the whole ``train`` command, measured from outside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    budgets = argv[: argv.index("--")] if "--" in argv else argv
    keep = None
    if "--keep" in budgets:  # --keep DIR: leave the run folders there
        keep = Path(budgets.pop(budgets.index("--keep") + 1))
        budgets.remove("--keep")
    data_dir = os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(budgets):
            budget, _, mode = spec.partition(":")
            out = (keep or Path(tmp)) / f"run{i}-{budget}{'-' + mode if mode else ''}"
            command = [
                sys.executable, "-m", "cifar10_resnet50", "train", "--budget", budget,
                "--weights", "none", "--optimizer", "adamw", "--lr", "2e-3", "--no-progress",
                "--out", str(out), "--data-dir", data_dir, *extra,
            ]  # fmt: skip
            if mode == "progressive":
                command.append("--progressive")
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            t0 = time.perf_counter()
            done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            if done.returncode != 0:  # e.g. a budget below one epoch: its one-line error
                print(spec, f"exit {done.returncode} after {wall:.1f} s", flush=True)
                continue
            plan = json.loads((out / "plan.json").read_text())
            test = json.loads((out / "eval" / "metrics.json").read_text())["accuracy"]
            rows.append((spec, plan, wall, test))
            print(spec, json.dumps(plan), f"wall {wall:.1f} s", f"test {test:.4f}", flush=True)
    print()
    print("| budget | plan | planned end | actual | actual / budget | test accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for spec, plan, wall, test in rows:
        sizes = sorted(set(plan["sizes"]))
        px = f"{sizes[0]}→{sizes[-1]} px" if len(sizes) > 1 else f"{sizes[0]} px"
        print(
            f"| {spec} | {plan['epochs']} × {plan['steps_per_epoch']} steps, {px} | "
            f"{plan['elapsed_s'] + plan['train_s'] + plan['final_s']:.0f} s | {wall:.0f} s | "
            f"{wall / plan['budget_s']:.3f} | {100 * test:.2f} % |"
        )


if __name__ == "__main__":
    main()
