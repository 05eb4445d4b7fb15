"""Training throughput of two versions of this code, side by side: for a refactor that must not
change speed (issue 18's "one training core": before vs after).

Each git revision is checked out into a temporary worktree; ``train.run`` of each runs in its
own child process (that worktree's ``src`` first on ``sys.path``), alternating A, B, A, B...
so drift on a shared machine hits both alike. Each run trains 2 epochs over the same images;
the second (warm) epoch's img/s comes from the run's own metrics.jsonl. Prints the medians
and their ratio as a Markdown row.

    python benchmarks/train_versions.py --data-dir ../shared/cifar10 bb3e420 HEAD --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cifar10_resnet50 import config
from cifar10_resnet50.training import train
data_dir, px, images, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with tempfile.TemporaryDirectory() as out:
    cfg = config.override(config.Config(), {
        "data.data_dir": data_dir, "data.download": False, "data.val_size": 0,
        "data.subset": images, "model.weights": "none", "model.image_size": px,
        "train.epochs": 2, "train.batch_size": batch, "train.progress": False,
        "train.tensorboard": False, "train.out": out + "/run"})
    train.run(cfg, final_eval=False)
    rows = [json.loads(x) for x in Path(out, "run", "metrics.jsonl").read_text().splitlines()]
print("RESULT", rows[-1]["img_per_s"])
"""


def worktree(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev],
        check=True,
        capture_output=True,
    )
    return into / "src"


@contextlib.contextmanager
def worktrees(revs: tuple[str, ...]) -> Iterator[dict[str, Path]]:
    """``{rev: its src folder}``, each revision checked out into a temporary worktree (``.``:
    this working tree as it is), removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        try:
            for i, rev in enumerate(revs):
                trees[rev] = ROOT / "src" if rev == "." else worktree(rev, Path(tmp) / f"v{i}")
            yield trees
        finally:
            for i, rev in enumerate(revs):
                if rev != ".":
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force",
                         str(Path(tmp) / f"v{i}")], capture_output=True,
                    )  # fmt: skip


def run_once(src: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-c", CHILD, str(src), args.data_dir, str(args.px),
           str(args.images), str(args.batch_size)]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return float(line.split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="git revision A (e.g. the commit before a refactor)")
    p.add_argument("after", help="git revision B (e.g. HEAD)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--px", type=int, default=32)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with worktrees((args.before, args.after)) as trees:
        results: dict[str, list[float]] = {rev: [] for rev in trees}
        for i in range(args.repeats):
            for rev, src in trees.items():
                results[rev].append(run_once(src, args))
                print(f"repeat {i + 1}: {rev} {results[rev][-1]:.1f} img/s", file=sys.stderr)
    a, b = (statistics.median(results[rev]) for rev in trees)
    print(f"| {args.px} px, {args.images} images, batch {args.batch_size} | {args.before}: "
          f"{a:.1f} img/s | {args.after}: {b:.1f} img/s | {b / a:.3f}× | "
          f"runs: {json.dumps(results)} |")  # fmt: skip


if __name__ == "__main__":
    main()
