"""CPU inference paths side by side: throughput, latency, agreement and accuracy.

For one trained checkpoint, in one process: eager fp32 (the plain model, as a user would run
it), eager bf16 (our Predictor: channels_last + bf16 autocast), TorchScript, ONNX Runtime fp32
and ONNX Runtime int8 (static quantization calibrated on training images). Each path is fed
uint8 images and returns probabilities.

- throughput: img/s at batch 64, median of ``--repeats`` timed calls after a warm-up;
- latency: batch 1, p50 and p99 of ``--latency-calls`` calls;
- top-1 agreement with eager fp32 and accuracy, on the whole CIFAR-10 test set.

    python benchmarks/inference.py runs/X/best.pt --data-dir ../shared/cifar10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cifar10_resnet50.data import cifar10

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, x, repeats: int) -> list[float]:
    fn(x)  # warm-up (allocations, kernel selection)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DATA_DIR", "../shared/cifar10"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--latency-calls", type=int, default=100)
    p.add_argument("--calibration-images", type=int, default=1000)
    args = p.parse_args()

    import torch

    from cifar10_resnet50 import checkpoint
    from cifar10_resnet50.serving import export, inference

    arrays = cifar10.load(cifar10.resolve_data_dir(args.data_dir))
    test_x = arrays.test_x.numpy()  # uint8 [N,3,32,32]
    test_y = arrays.test_y.numpy()

    model, meta = checkpoint.load_model(args.checkpoint, "cpu")
    model = model.float().eval()

    @torch.no_grad()
    def eager_fp32(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(model(torch.from_numpy(batch)), 1).numpy()

    paths = {"eager fp32": eager_fp32}
    paths["eager bf16 (channels_last)"] = inference.load(args.checkpoint, precision="bf16").run
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt, int8, file in (
            ("TorchScript fp32", "torchscript", False, "m.torchscript.pt"),
            ("ONNX Runtime fp32", "onnx", False, "m.onnx"),
            ("ONNX Runtime int8", "onnx", True, "m.int8.onnx"),
        ):
            out = Path(tmp) / file
            export.run(
                args.checkpoint,
                fmt,
                out=out,
                int8=int8,
                data_dir=args.data_dir,
                parity_images=64,
                calibration_images=args.calibration_images,
            )
            paths[name] = inference.load(out, allow_code=True).run  # our own export

        print(
            f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}; model {meta['arch']} at {meta['image_size']} px "
            f"({meta['weights']}); {len(test_x)} test images"
        )
        print(
            "| path | img/s at batch 64 (median) | × eager fp32 | batch-1 p50 ms | batch-1 p99 ms "
            "| top-1 agreement vs eager fp32 | test accuracy |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        reference = None
        base_rate = None
        for name, run in paths.items():
            rate = 64 / statistics.median(timed(run, test_x[:64], args.repeats))
            lat = sorted(timed(run, test_x[:1], args.latency_calls))
            p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            pred = np.concatenate(
                [run(test_x[i : i + 64]) for i in range(0, len(test_x), 64)]
            ).argmax(1)
            if reference is None:
                reference, base_rate = pred, rate
            print(
                f"| {name} | {rate:,.0f} | {rate / base_rate:.2f} | {1000 * p50:.1f} | {1000 * p99:.1f} | "
                f"{100 * (pred == reference).mean():.2f}% | {100 * (pred == test_y).mean():.2f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
