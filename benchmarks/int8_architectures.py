"""int8 ONNX export on other backbones: Conv/Gemm only (before) against Conv/Gemm + MatMul by a
weight (now; attention's activation-by-activation MatMuls stay fp32), side by side.

For each architecture: a model at 64 px with random-init weights (ImageNet weights cannot be
downloaded here) and a random head, exported once per mode with CIFAR-10 calibration images;
then ONNX Runtime img/s of the fp32 graph and of each int8 graph, measured in turns
(``--repeats`` rounds, medians), and each int8 graph's top-1 agreement with the fp32 graph on
1,000 test images. Random weights say whether the int8 graph computes the same function; what
accuracy a fine-tuned model keeps is for the export's own check (it fails under 97 %
agreement on the whole test set).

    python benchmarks/int8_architectures.py --data-dir ../shared/cifar10 [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from architectures import timed  # noqa: E402
from cifar10_resnet50 import checkpoint  # noqa: E402
from cifar10_resnet50 import model as model_lib  # noqa: E402
from cifar10_resnet50.data import cifar10  # noqa: E402
from cifar10_resnet50.serving import export, inference  # noqa: E402

ARCHS = ("resnet50", "convnext_tiny", "vit_b_16", "efficientnet_v2_s")


def make_checkpoint(arch: str, folder: Path) -> Path:
    torch.manual_seed(0)
    net = model_lib.build("none", 64, 10, arch=arch, progress=False)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.05)
        net.head.bias.normal_(0, 0.1)
    path = folder / f"{arch}.pt"
    meta = model_lib.model_meta("none", 64, cifar10.CLASSES, 32, arch=arch)
    checkpoint.save(path, {"model_meta": meta, "model": net.state_dict(), "config": {}})
    return path


def rate(run, x: np.ndarray) -> float:
    return len(x) / timed(lambda: run(x), 5)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "cifar10"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--archs", nargs="*", default=list(ARCHS))
    args = p.parse_args()
    test_x = cifar10.load(Path(args.data_dir)).test_x[:1000].numpy()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 64, 64 px")
    print("| arch | ORT fp32 img/s | int8 Conv/Gemm | int8 + MatMul | speed-up before → now "
          "| agreement before / now |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            ckpt = make_checkpoint(arch, Path(tmp))
            fp32 = export.run(ckpt, "onnx", data_dir=args.data_dir, parity_images=8).path
            meta = checkpoint.load(ckpt)["model_meta"]
            calibration = export._train_images(meta, args.data_dir, 256)
            files = {"fp32": fp32}
            for mode, matmuls in (("before", False), ("now", True)):
                files[mode] = Path(tmp) / f"{arch}.{mode}.int8.onnx"
                export._quantize_int8(fp32, files[mode], calibration, meta, matmuls)
            runs = {k: inference.load(v, backend="onnx").run for k, v in files.items()}
            speeds = {k: [] for k in runs}
            for _ in range(args.repeats):
                for k, run in runs.items():
                    speeds[k].append(rate(run, test_x[:64]))
            med = {k: statistics.median(v) for k, v in speeds.items()}
            ref = np.concatenate([runs["fp32"](test_x[i : i + 64]) for i in range(0, 1000, 64)])
            agree = {}
            for k in ("before", "now"):
                out = np.concatenate([runs[k](test_x[i : i + 64]) for i in range(0, 1000, 64)])
                agree[k] = float((out.argmax(1) == ref.argmax(1)).mean())
            print(f"| {arch} | {med['fp32']:.0f} | {med['before']:.0f} | {med['now']:.0f} "
                  f"| {med['before'] / med['fp32']:.2f}× → {med['now'] / med['fp32']:.2f}× "
                  f"| {agree['before']:.1%} / {agree['now']:.1%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
