"""A torchrun worker for the distributed tests: trains a tiny run through ``train.run`` and
records, per rank, the weights at each save and the loss of each step.

Usage: torchrun --nproc-per-node N tests/dist_worker.py OUT DATA_ROOT BATCH [--sync-bn]
       [--stop-after STEPS]
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifar10_resnet50 import config as C
from cifar10_resnet50.training import train


def main() -> None:
    out, root, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sync_bn = "--sync-bn" in sys.argv
    stop_after = None
    if "--stop-after" in sys.argv:
        stop_after = int(sys.argv[sys.argv.index("--stop-after") + 1])
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    losses: list[float] = []
    original_step = train._train_step

    nan_at = None  # --nan-at STEP: this rank's loss becomes NaN at that step (rank 1 only)
    if "--nan-at" in sys.argv and rank == 1:
        nan_at = int(sys.argv[sys.argv.index("--nan-at") + 1])

    def recording_step(r, forward, xb, target):
        loss, logits = original_step(r, forward, xb, target)
        losses.append(float(loss))
        if nan_at is not None and len(losses) == nan_at:
            loss = loss * float("nan")
        return loss, logits

    original_end = train._end_epoch

    def recording_end(r, *args):  # every rank's weights after each epoch
        original_end(r, *args)
        torch.save(r.model.state_dict(), out.parent / f"{out.name}.rank{rank}.pt")

    train._train_step = recording_step
    train._end_epoch = recording_end
    cfg = C.override(
        C.Config(),
        {
            "data.data_dir": root,
            "data.subset": 128,
            "data.val_size": 32,
            "model.weights": "none",
            "model.image_size": 32,
            "train.epochs": 1,
            "train.batch_size": batch,
            "train.device": "cpu",
            "train.progress": False,
            "train.tensorboard": False,
            "train.sync_bn": sync_bn,
            # fp32: the equivalence tests compare 1 × 32 with 2 × 16, and bf16 matmuls round
            # differently at different batch shapes (±1e-3 in the loss after 3 steps).
            "train.precision": "fp32",
            "optim.optimizer": "adamw",
            "optim.lr": 1e-3,
            "train.out": str(out),
        },
    )
    try:
        train.run(cfg, final_eval=False, stop_after_steps=stop_after)
    except Exception as e:  # what the CLI would print, as one line
        print(f"rank {rank} error: {e}", file=sys.stderr)
        sys.exit(2)
    (out.parent / f"{out.name}.rank{rank}.losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
