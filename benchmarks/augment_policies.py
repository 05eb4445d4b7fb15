"""Per-image TrivialAugment on a batch: ours (data/policies.py, every op family for the
whole batch, per-image selection) against the field's libraries, which draw one op per call
(kornia's ``TrivialAugment``, torchvision's ``TrivialAugmentWide``), so per-image ops take a
call per image. Also shown: one library call for the whole batch (one op for all, not what
the policy means), as the floor of any per-batch library approach.

    .venv/bin/python benchmarks/augment_policies.py [--batch 128] [--size 32] [--repeats 5]

Medians of --repeats, interleaved, on this machine's CPU threads (or --device cuda).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from torchvision.transforms import v2

    from cifar10_resnet50.data import policies

    dev = torch.device(args.device)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=dev)
    tv = v2.TrivialAugmentWide()
    contenders = {
        "ours, per image (one batched pass)": lambda: policies.apply_policy(
            x, torch.Generator(device=dev).manual_seed(0), "trivial"
        ),
        "torchvision TrivialAugmentWide, a call per image": lambda: torch.stack([tv(i) for i in x]),
        "torchvision TrivialAugmentWide, one call per batch (one op for all)": lambda: tv(x),
    }
    try:
        import kornia.augmentation as K
        from kornia.augmentation.auto import TrivialAugment

        ka = K.AugmentationSequential(TrivialAugment())
        xf = x.float() / 255
        contenders["kornia TrivialAugment, a call per image"] = lambda: torch.cat(
            [ka(i[None]) for i in xf]
        )
        contenders["kornia TrivialAugment, one call per batch (one op for all)"] = lambda: ka(xf)
    except ImportError:
        print("kornia not installed: pip install kornia to compare with it")
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    ours = statistics.median(times[next(iter(times))])
    print(f"batch {args.batch} × {args.size} px on {dev} ({torch.get_num_threads()} threads), "
          f"median of {args.repeats}:")  # fmt: skip
    print("| method | ms per batch | img/s | × ours |\n|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1000 * m:.1f} | {args.batch / m:,.0f} | {m / ours:.2f} |")


if __name__ == "__main__":
    main()
