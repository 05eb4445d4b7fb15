"""Train-step and inference img/s per architecture (issue 21, ``--arch``), on this machine:
random-init models at one resolution, the project's own step (``core.train_step``: SGD,
autocast, channels_last, clipping) and its evaluation path (``evaluate.predict_logits``).

    .venv/bin/python benchmarks/architectures.py [--size 64] [--batch 32] [--repeats 3]

Medians of --repeats timed calls after one warm-up; bf16 where the device has it (as
``--precision auto``). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    "resnext50_32x4d", "convnext_tiny", "efficientnet_v2_s", "vit_b_16",
]  # fmt: skip


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    args = ap.parse_args()
    from cifar10_resnet50 import config as C
    from cifar10_resnet50 import model as model_lib
    from cifar10_resnet50.evaluation.evaluate import predict_logits
    from cifar10_resnet50.runtime import pick_precision
    from cifar10_resnet50.training import core

    device = torch.device("cpu")
    amp = pick_precision("auto", device)
    optim = C.resolve(C.Config(), "cpu").optim
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,))
    print(f"{args.size} px, batch {args.batch}, {amp or 'fp32'}, {torch.get_num_threads()} "
          f"threads, medians of {args.repeats}")  # fmt: skip
    print("| arch | params (M) | train step img/s | inference img/s |\n|---|---:|---:|---:|")
    for arch in args.archs:
        torch.manual_seed(0)
        model = model_lib.build("none", args.size, 10, arch=arch).to(
            memory_format=torch.channels_last
        )
        opt = core.Optimization.build(
            model, optim, pretrained=False, head_only=False, total_steps=100, amp_dtype=amp,
            device_type="cpu",
        )  # fmt: skip
        recipe = core.StepRecipe(device, amp, 0.1, 5.0, channels_last=True)
        model.train()
        step = timed(
            lambda m=model, o=opt, r=recipe: core.train_step(m, m, o, r, x, y), args.repeats
        )
        infer = timed(
            lambda m=model: predict_logits(
                m, x, batch_size=args.batch, device=device, amp_dtype=amp
            ),
            args.repeats,
        )
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {arch} | {params:.1f} | {args.batch / step:,.0f} | {args.batch / infer:,.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
