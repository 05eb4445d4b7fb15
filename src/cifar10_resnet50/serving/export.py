"""The ``export`` command: TorchScript or ONNX (optionally int8), with a parity check.

Exports take uint8 RGB ``[B,3,S,S]`` (``S``: the model's ``input_size``; dynamic batch) and
return softmax probabilities ``float32 [B,C]``; preprocessing is inside. Model facts travel
inside the file (TorchScript: ``meta.json`` extra file; ONNX: the ``cifar10_resnet50``
metadata property). After writing, the export is compared with the eager model on real test
images of the model's data. No training code is imported.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checkpoint, data
from ..errors import UserError
from ..fileio import prepare_output, remove_stale_temps, temp_dir_beside, write_bytes
from . import inference
from .settings import EXPORT_FORMATS, ExportOptions

log = logging.getLogger(__name__)

PROB_TOLERANCE = 1e-4  # max |Δprobability| allowed between an fp32 export and eager fp32
# int8 cannot match fp32 to 1e-4: its bar is top-1 agreement with eager fp32 (and the accuracy,
# reported beside it).
INT8_AGREEMENT = 0.97
ONNX_OPSET = 17


class WithSoftmax(nn.Module):
    """uint8 ``[B,3,S,S]`` → probabilities ``float32 [B,C]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x).float(), dim=1)


@dataclass
class Parity:
    images: int
    source: str  # where the images came from
    top1_agreement: float
    max_abs_diff: float
    accuracy_eager: float | None = None
    accuracy_export: float | None = None

    def ok(self, tolerance: float | None) -> bool:
        return self.top1_agreement == 1.0 and (tolerance is None or self.max_abs_diff <= tolerance)


@dataclass
class ExportReport:
    path: Path
    format: str
    int8: bool
    parity: Parity
    passed: bool
    speed: dict[str, float] = field(default_factory=dict)  # img/s at batch 64, by name
    quantized: str = ""  # int8: which layers ("Conv, Gemm" or "Conv, Gemm, MatMul by a weight")

    def table(self) -> str:
        p = self.parity
        kind = f", int8: {self.quantized}" if self.int8 else ""
        lines = [
            f"exported {self.path} ({self.format}{kind})",
            f"parity on {p.images} {p.source}:",
            f"  top-1 agreement with eager fp32  {100 * p.top1_agreement:.2f}%",
            f"  max |Δprobability|               {p.max_abs_diff:.2e}"
            + ("" if self.int8 else f" (limit {PROB_TOLERANCE:.0e})"),
        ]
        if p.accuracy_eager is not None:
            lines.append(
                f"  accuracy eager fp32 / export    {100 * p.accuracy_eager:.2f}% / "
                f"{100 * (p.accuracy_export or 0):.2f}% (on these {p.images} images, fp32; "
                "evaluate's figure uses bf16 where the device has it)"
            )
        for name, rate in self.speed.items():
            lines.append(f"  speed {name:<26} {rate:,.0f} img/s (batch 64)")
        bar = f" (the bar: {INT8_AGREEMENT:.0%} top-1 agreement)" if self.int8 else ""
        lines.append("parity check: " + ("passed" if self.passed else "FAILED") + bar)
        return "\n".join(lines)


def _reference_images(
    meta: dict[str, Any], data_dir: str | Path | None, n: int
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The first ``n`` test images of the model's data (uint8 [N,3,S,S]) and labels, or random
    pixels of the model's input size when that data is not here."""
    try:
        arrays = data.for_model(meta, data_dir=data_dir, progress=False)
    except UserError as e:
        log.warning("no test images for the parity check (%s); using random images", e)
        rng = np.random.default_rng(0)
        size = meta["input_size"]
        return (
            rng.integers(0, 256, (min(n, 256), 3, size, size), dtype=np.uint8),
            None,
            "random images",
        )
    n = len(arrays.test_x) if n <= 0 else min(n, len(arrays.test_x))
    what = f"{data.label(arrays.source)} test images"
    return arrays.test_x[:n].numpy(), arrays.test_y[:n].numpy(), what


def _train_images(meta: dict[str, Any], data_dir: str | Path | None, n: int) -> np.ndarray:
    arrays = data.for_model(meta, data_dir=data_dir, progress=False)
    idx = torch.randperm(len(arrays.train_x), generator=torch.Generator().manual_seed(0))[:n]
    return arrays.train_x[idx].numpy()


def _batched(run, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def _rate(run, x: np.ndarray, batch: int = 64, repeats: int = 5) -> float:
    xb = x[:batch]
    run(xb)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(xb)
        times.append(time.perf_counter() - t0)
    return len(xb) / float(np.median(times))


def _example(meta: dict[str, Any]) -> torch.Tensor:
    """A batch of the model's input shape, to trace with (the batch axis is dynamic)."""
    size = meta["input_size"]
    return torch.zeros(2, 3, size, size, dtype=torch.uint8)


def _write_torchscript(wrapper: nn.Module, meta: dict[str, Any], out: Path) -> None:
    example = _example(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the fixed input-size branch
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        # The tracer's own re-trace check fails on ViT's shape asserts (a graph that differs
        # only in names); the parity check after export compares outputs, which is stronger.
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"meta.json": json.dumps(meta)})
    write_bytes(out, buf.getbuffer())


def _onnx_proto(wrapper: nn.Module, meta: dict[str, Any]) -> Any:
    """The fp32 graph with our metadata, built in memory (nothing on disk to leave behind)."""
    import onnx

    example = _example(meta)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not for users
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    _set_meta(proto, meta)
    onnx.checker.check_model(proto)
    return proto


def _write_onnx(wrapper: nn.Module, meta: dict[str, Any], out: Path) -> None:
    # One self-contained file (ResNet-50 is ~95 MB, under protobuf's 2 GB limit).
    write_bytes(out, _onnx_proto(wrapper, meta).SerializeToString())


def _set_meta(proto: Any, meta: dict[str, Any]) -> None:
    for prop in list(proto.metadata_props):
        if prop.key == inference.META_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = inference.META_KEY, json.dumps(meta)


def _matmuls(path: Path) -> tuple[list[str], list[str]]:
    """Names of the MatMul nodes by a weight (linear layers) and of those multiplying two
    activations (attention's Q·Kᵀ and A·V), naming unnamed nodes in the file first."""
    import onnx

    proto = onnx.load(str(path))
    weights = {t.name for t in proto.graph.initializer}
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    onnx.save(proto, str(path))
    by_weight, by_activation = [], []
    for n in proto.graph.node:
        if n.op_type == "MatMul":
            (by_weight if any(x in weights for x in n.input) else by_activation).append(n.name)
    return by_weight, by_activation


def _quantize_int8(
    fp32_path: Path, out: Path, calibration: np.ndarray, meta: dict[str, Any], matmuls: bool
) -> tuple[str, int]:
    """ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations),
    calibrated on training images; returns which layers it quantized and how many MatMuls.
    Only layers with weights are quantized: Conv, Gemm, and (``matmuls``) MatMul by a weight,
    a transformer's or ConvNeXt's linear layers: ViT-B/16 from 1.04× to 2.9–3.0× fp32's speed,
    ConvNeXt-T from 1.03× to 1.6× (benchmarks/int8_architectures.py, two runs). Preprocessing,
    softmax and attention's activation-by-activation MatMuls stay fp32: those have no weight
    to quantize per channel, and their calibrated ranges are what static quantization handles
    worst."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"images": calibration[i : i + 32]} for i in range(0, len(calibration), 32)]
            )

        def get_next(self):
            return next(self.batches, None)

    # ORT's quantizer works on files: its scratch files go beside fp32_path (a temporary
    # folder the caller removes).
    prepared, quantized = fp32_path.with_name("prep.onnx"), fp32_path.with_name("q.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    by_weight, by_activation = _matmuls(prepared)
    fp32_matmuls = by_activation if matmuls else by_activation + by_weight
    logging.disable(logging.INFO)  # the quantizer logs per-tensor chatter on the root logger
    try:
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            nodes_to_exclude=fp32_matmuls,
        )
    finally:
        logging.disable(logging.NOTSET)
    proto = onnx.load(str(quantized))
    ops = "Conv, Gemm, MatMul by a weight" if matmuls and by_weight else "Conv, Gemm"
    _set_meta(proto, {**meta, "precision": "int8", "int8_ops": ops})
    write_bytes(out, proto.SerializeToString())
    return ops, len(by_weight) if matmuls else 0


def _eager(wrapper: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The eager fp32 model's probabilities [N,C] for uint8 images [N,3,S,S]: the reference
    every export is checked against (computed once, even when int8 quantizes twice)."""

    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return wrapper(torch.from_numpy(batch)).numpy()

    return _batched(run, images)


def _parity(
    p_eager: np.ndarray,
    exported: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray | None,
    source: str,
) -> Parity:
    """The export against the eager model's probabilities on the same images."""
    p_export = _batched(exported, images)
    parity = Parity(
        images=len(images),
        source=source,
        top1_agreement=float((p_eager.argmax(1) == p_export.argmax(1)).mean()),
        max_abs_diff=float(np.abs(p_eager - p_export).max()),
    )
    if labels is not None:
        parity.accuracy_eager = float((p_eager.argmax(1) == labels).mean())
        parity.accuracy_export = float((p_export.argmax(1) == labels).mean())
    return parity


def run(
    checkpoint_path: str | Path,
    fmt: str,
    *,
    out: str | Path | None = ExportOptions.out,
    int8: bool = ExportOptions.int8,
    data_dir: str | Path | None = ExportOptions.data_dir,
    parity_images: int | None = ExportOptions.parity_images,
    calibration_images: int = ExportOptions.calibration_images,
) -> ExportReport:
    """Export, then check against eager fp32 on ``parity_images`` test images (default: 1,000;
    for int8 the whole test set, since its accuracy is what is reported)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {EXPORT_FORMATS}")
    if int8 and fmt != "onnx":
        raise UserError("--int8 is for --format onnx (ONNX Runtime static quantization)")
    checkpoint_path = Path(checkpoint_path)
    model, meta = checkpoint.load_model(checkpoint_path, "cpu")
    wrapper = WithSoftmax(model.float().eval()).eval()
    suffix = {"torchscript": ".torchscript.pt", "onnx": ".int8.onnx" if int8 else ".onnx"}[fmt]
    out_path = Path(out) if out else checkpoint_path.with_name(checkpoint_path.stem + suffix)
    prepare_output(out_path, [checkpoint_path], "--out")
    remove_stale_temps(Path(os.path.realpath(out_path)).parent)
    export_meta = {**meta, "precision": "int8" if int8 else "fp32", "source": checkpoint_path.name}

    if parity_images is None:
        parity_images = 0 if int8 else 1000  # 0 = all
    reference = _reference_images(meta, data_dir, parity_images)
    if int8:
        calibration = _train_images(meta, data_dir, calibration_images)
        return _export_int8(wrapper, export_meta, out_path, calibration, reference)
    if fmt == "torchscript":
        _write_torchscript(wrapper, export_meta, out_path)
    else:
        _write_onnx(wrapper, export_meta, out_path)
    # allow_code: the TorchScript file is the one we have just written.
    exported = inference.load(out_path, backend=fmt, batch_size=64, allow_code=True)
    parity = _parity(_eager(wrapper, reference[0]), exported.run, *reference)
    return ExportReport(out_path, fmt, False, parity, parity.ok(PROB_TOLERANCE), {})


def _export_int8(
    wrapper: nn.Module,
    meta: dict[str, Any],
    out: Path,
    calibration: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray | None, str],
) -> ExportReport:
    """The int8 ONNX file, checked against eager fp32 and timed against the fp32 graph. When
    quantizing the MatMuls costs too much agreement, it quantizes again without them (a
    warning says so): a slower file that passes beats a faster one that does not."""
    images = reference[0]
    p_eager = _eager(wrapper, images)
    with temp_dir_beside(out) as scratch:
        fp32_path = scratch / "fp32.onnx"
        fp32_path.write_bytes(_onnx_proto(wrapper, meta).SerializeToString())
        for matmuls in (True, False):
            ops, quantized = _quantize_int8(fp32_path, out, calibration, meta, matmuls)
            exported = inference.load(out, backend="onnx", batch_size=64)
            parity = _parity(p_eager, exported.run, *reference)
            passed = parity.top1_agreement >= INT8_AGREEMENT
            if passed or not quantized:
                break
            log.warning(
                "int8 with %d MatMuls quantized agrees with fp32 on %.1f%% of top-1 answers "
                "(under %.0f%%): quantizing Conv and Gemm only",
                quantized, 100 * parity.top1_agreement, 100 * INT8_AGREEMENT,
            )  # fmt: skip
        fp32 = inference.load(fp32_path, backend="onnx")
        speed = {"onnxruntime fp32": _rate(fp32.run, images)}
    speed["onnxruntime int8"] = _rate(exported.run, images)
    return ExportReport(out, "onnx", True, parity, passed, speed, quantized=ops)
