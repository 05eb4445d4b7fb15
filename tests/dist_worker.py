"""A torchrun worker for the distributed tests: trains a tiny run through ``train.run`` and
records, per rank, the weights at each save and the loss of each step.

Usage: torchrun --nproc-per-node N tests/dist_worker.py OUT DATA_ROOT BATCH [--sync-bn]
       [--stop-after STEPS] [--nan-at STEP] [--budget DURATION] [--accum-steps N] [--ema D]

``--budget`` plans the run with rank 1's clock running 3× as fast as rank 0's (so each rank
measures different times) and records each rank's plan.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifar10_resnet50 import config as C
from cifar10_resnet50.training import train
from cifar10_resnet50.training.callbacks import Callback


def main() -> None:
    out_dir, root, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sync_bn = "--sync-bn" in sys.argv
    stop_after = None
    if "--stop-after" in sys.argv:
        stop_after = int(sys.argv[sys.argv.index("--stop-after") + 1])
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    losses: list[float] = []
    nan_at = None  # --nan-at STEP: this rank's loss becomes NaN at that step (rank 1 only)
    if "--nan-at" in sys.argv and rank == 1:
        nan_at = int(sys.argv[sys.argv.index("--nan-at") + 1])

    budget = sys.argv[sys.argv.index("--budget") + 1] if "--budget" in sys.argv else None
    accum = int(sys.argv[sys.argv.index("--accum-steps") + 1]) if "--accum-steps" in sys.argv else 1
    ema = float(sys.argv[sys.argv.index("--ema") + 1]) if "--ema" in sys.argv else 0.0

    class Recorder(Callback):
        def step_end(self, trainer, state, out):
            if not losses and budget:  # the plan this rank follows
                plan = {"epochs": trainer.cfg.train.epochs, "steps": trainer.steps_per_epoch}
                (out_dir.parent / f"{out_dir.name}.rank{rank}.plan.json").write_text(
                    json.dumps(plan)
                )
            losses.append(float(out.loss))
            if nan_at is not None and len(losses) == nan_at:
                out.loss = out.loss * float("nan")

        def epoch_end(self, trainer, state, row, val_logits):  # every rank's weights
            torch.save(trainer.model.state_dict(), out_dir.parent / f"{out_dir.name}.rank{rank}.pt")
            evaluated = trainer.opt.evaluated(trainer.model).state_dict()  # the EMA's, with --ema
            torch.save(evaluated, out_dir.parent / f"{out_dir.name}.rank{rank}.evaluated.pt")

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
            "train.accum_steps": accum,
            "train.ema": ema,
            # fp32: the equivalence tests compare 1 × 32 with 2 × 16, and bf16 matmuls round
            # differently at different batch shapes (±1e-3 in the loss after 3 steps).
            "train.precision": "fp32",
            "optim.optimizer": "adamw",
            "optim.lr": 1e-3,
            "train.out": str(out_dir),
            **({"train.budget": budget, "train.epochs": None} if budget else {}),
        },
    )
    start = time.perf_counter()
    clock = lambda: start + (1 + 2 * rank) * (time.perf_counter() - start)  # noqa: E731
    try:
        train.run(
            cfg, final_eval=False, stop_after_steps=stop_after, callbacks=[Recorder()],
            clock=clock if budget else time.perf_counter,
        )  # fmt: skip
    except Exception as e:  # what the CLI would print, as one line
        print(f"rank {rank} error: {e}", file=sys.stderr)
        sys.exit(2)
    (out_dir.parent / f"{out_dir.name}.rank{rank}.losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
