"""Where an epoch's time goes, before and after issue 19's "an epoch is all training": the
training loop's seconds against the whole of ``loop.fit`` (validation, checkpoint saves,
TensorBoard, logging), for two versions of this code side by side.

Each revision runs in its own child process from a temporary worktree (``.`` is the working
tree as it is), alternating A, B, A, B... The child times ``loop.fit`` as a whole (patched in
the child only; its end includes the last checkpoint write in both versions) and reads each
epoch's training-loop seconds from the run's metrics.jsonl. Settings are the CPU defaults
with TensorBoard on and a validation split, so every per-epoch cost is there.

    python benchmarks/epoch_split.py --data-dir ../shared/cifar10 491f28b . --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from train_versions import worktrees

CHILD = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cifar10_resnet50 import config
from cifar10_resnet50.training import loop, train
data_dir, px, images, batch, epochs = sys.argv[2], *map(int, sys.argv[3:7])
fit_s = []
real_fit = loop.fit
def timed_fit(*args, **kwargs):
    t0 = time.perf_counter()
    stopped = real_fit(*args, **kwargs)
    fit_s.append(time.perf_counter() - t0)
    return stopped
loop.fit = timed_fit
with tempfile.TemporaryDirectory() as out:
    cfg = config.override(config.Config(), {
        "data.data_dir": data_dir, "data.download": False, "data.val_size": 1000,
        "data.subset": images, "model.weights": "none", "model.image_size": px,
        "train.epochs": epochs, "train.batch_size": batch, "train.progress": False,
        "train.out": out + "/run"})
    train.run(cfg, final_eval=False)
    rows = [json.loads(x) for x in Path(out, "run", "metrics.jsonl").read_text().splitlines()]
train_s = sum(r["seconds"] for r in rows)
print("RESULT", json.dumps({"fit_s": fit_s[0], "train_s": train_s, "epochs": len(rows),
                            "split": [r.get("time") for r in rows]}))
"""


def run_once(src: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(src), args.data_dir, str(args.px), str(args.images),
           str(args.batch_size), str(args.epochs)]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="git revision A")
    p.add_argument("after", help="git revision B, or . for the working tree")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--images", type=int, default=3000)  # 2,000 trained + 1,000 validated
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with worktrees((args.before, args.after)) as trees:
        results: dict[str, list[dict]] = {rev: [] for rev in trees}
        for i in range(args.repeats):
            for rev, src in trees.items():
                r = run_once(src, args)
                results[rev].append(r)
                print(f"repeat {i + 1}: {rev} fit {r['fit_s']:.1f} s, training loop "
                      f"{r['train_s']:.1f} s, split {r['split']}", file=sys.stderr)  # fmt: skip
    print("| version | fit s (median) | training loop s | outside the loop, s per epoch | share |")
    print("|---|---:|---:|---:|---:|")
    for rev, runs in results.items():
        fit = statistics.median(r["fit_s"] for r in runs)
        train = statistics.median(r["train_s"] for r in runs)
        other = statistics.median((r["fit_s"] - r["train_s"]) / r["epochs"] for r in runs)
        share = statistics.median(1 - r["train_s"] / r["fit_s"] for r in runs)
        print(f"| {rev} | {fit:.1f} | {train:.1f} | {other:.2f} | {100 * share:.1f} % |")


if __name__ == "__main__":
    main()
