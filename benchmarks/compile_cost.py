"""What `torch.compile` costs and saves for our training step, cold and with the inductor's
on-disk cache warm (a second run of the same shapes), each in a fresh process.

    python benchmarks/compile_cost.py --px 64 --batch 64     # this CPU
    python benchmarks/compile_cost.py --device cuda --px 160 --batch 512

Prints: eager s/step; compiled first step (≈ the compile) cold and warm; compiled s/step;
and the break-even number of steps (compile cost ÷ time saved per step), the rule
`--compile auto` applies.
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


def child(device: str, px: int, batch: int, steps: int, compiled: bool) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "src"))
    from cifar10_resnet50 import model as model_lib

    dev = torch.device(device)
    torch.manual_seed(0)
    net = (
        model_lib.build("none", px, 10, progress=False)
        .to(dev)
        .to(memory_format=torch.channels_last)
    )
    fwd = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"first_s": first, "per_step_s": (time.perf_counter() - t0) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(
            json.dumps(
                child(args.device, args.px, args.batch, args.steps, args.child == "compiled")
            )
        )
        return
    cache = tempfile.mkdtemp(prefix="inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}

    def run(mode: str) -> dict:
        cmd = [sys.executable, __file__, "--child", mode, "--device", args.device,
               "--px", str(args.px), "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    eager, cold, warm = run("eager"), run("compiled"), run("compiled")
    saved = eager["per_step_s"] - cold["per_step_s"]
    print(f"{args.device}, {args.px} px, batch {args.batch}, bf16 autocast, channels_last")
    print("| what | seconds |\n|---|---:|")
    print(f"| eager step | {eager['per_step_s']:.3f} |")
    print(
        f"| compiled step | {cold['per_step_s']:.3f} ({eager['per_step_s'] / cold['per_step_s']:.2f}× eager) |"
    )
    print(f"| first compiled step, cold cache (≈ compile) | {cold['first_s']:.1f} |")
    print(f"| first compiled step, warm cache (second run) | {warm['first_s']:.1f} |")
    for name, first in (("cold", cold["first_s"]), ("warm", warm["first_s"])):
        cost = first - eager["first_s"]
        steps = cost / saved if saved > 0 else float("inf")
        print(f"| break-even, {name} cache | {steps:,.0f} steps |")


if __name__ == "__main__":
    main()
