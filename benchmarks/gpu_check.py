"""GPU check: training and inference img/s of our model at 128 and 224 px.

Meant for one run of a few minutes on a CUDA machine with PyTorch installed and no network:
bf16 autocast, channels_last, torch.compile off and on. Inputs are uint8 32 px images resident
on the GPU (as in training), resized inside the model. Also says whether the ImageNet weights
are already in torch's cache there (they cannot be downloaded without a network).

    bash benchmarks/gpu_check.sh            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --sizes 64 --steps 3   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def weights_cache_report() -> str:
    import torch
    import torchvision

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    lines = []
    for w in (
        torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    ):
        name = w.url.rsplit("/", 1)[-1]
        lines.append(
            f"  {w}: {'cached' if (folder / name).is_file() else 'NOT cached'} ({folder / name})"
        )
    return "\n".join(lines)


def measure(
    device, px: int, compile_: bool, batch: int, steps: int, warmup: int
) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    from cifar10_resnet50 import model as model_lib

    torch.manual_seed(0)
    net = (
        model_lib.build("none", px, 10, progress=False)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    fwd = torch.compile(net) if compile_ else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = torch.bfloat16

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(fwd(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    for _ in range(warmup):
        train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    train_rate = batch * steps / (time.perf_counter() - t0)

    net.eval()
    with torch.no_grad():
        for _ in range(warmup):
            with torch.autocast(device.type, dtype=dtype):
                fwd(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype):
                fwd(x)
        sync()
    infer_rate = batch * steps / (time.perf_counter() - t0)
    return train_rate, infer_rate


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    import torch
    import torchvision

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; torch {torch.__version__}; torchvision {torchvision.__version__}; "
        f"CUDA {torch.version.cuda}; bf16 autocast, channels_last, batch {args.batch_size}"
    )
    print("pretrained weights in the torch cache:")
    print(weights_cache_report())
    print("\n| px | compile | train img/s | inference img/s |")
    print("|---:|---|---:|---:|")
    for px in args.sizes:
        for compile_ in (False, True):
            t0 = time.perf_counter()
            try:
                tr, inf = measure(device, px, compile_, args.batch_size, args.steps, args.warmup)
                print(
                    f"| {px} | {'on' if compile_ else 'off'} | {tr:.0f} | {inf:.0f} |"
                    f"  <!-- {time.perf_counter() - t0:.0f} s incl. warm-up -->",
                    flush=True,
                )
            except Exception as e:  # report and go on: one failing mode must not hide the rest
                print(
                    f"| {px} | {'on' if compile_ else 'off'} | failed: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120]} | |",
                    flush=True,
                )
    if device.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
