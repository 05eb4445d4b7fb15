"""One ``Predictor`` for predict, serve and the benchmarks: load once, preprocess once, batch.

It reads three kinds of model file, all taking uint8 RGB images:

* a training checkpoint (``best.pt``/``last.pt``): eager PyTorch, fp32 or bf16 autocast;
* a TorchScript export (``*.torchscript.pt``): preprocessing and softmax inside;
* an ONNX export (``*.onnx``): run by ONNX Runtime, fp32 or int8.

Model facts (class names, input and image size, weights used) come from inside each file. This module
imports no training code.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, first_line
from ..fileio import require_file
from ..meta import validate_meta
from .settings import BACKENDS, ModelOptions, PredictOptions

log = logging.getLogger(__name__)

META_KEY = "cifar10_resnet50"  # key of the JSON model facts inside exports


def detect_backend(path: Path) -> str:
    """By file type: .onnx → onnx; a TorchScript archive → torchscript; else a checkpoint."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    try:
        with zipfile.ZipFile(path) as z:
            if any("/code/" in n for n in z.namelist()):
                return "torchscript"
    except (zipfile.BadZipFile, OSError):
        pass
    return "torch"


@dataclass
class Predictor:
    """``probabilities(images)``: uint8 ``[N,S,S,3]`` RGB (``S``: :attr:`input_size`) →
    float32 ``[N,C]``."""

    backend: str
    path: Path
    meta: dict[str, Any]
    run: Callable[[np.ndarray], np.ndarray]  # uint8 [B,3,S,S] → float32 probs [B,C]
    batch_size: int = 64
    precision: str = "fp32"
    on_gpu: bool = False  # where the model runs: decoding then gets the CPU's cores

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def input_size(self) -> int:
        """Pixels a side of the images the model takes (decode user images to this size)."""
        return int(self.meta["input_size"])

    def probabilities(self, images: np.ndarray, tta: bool = False) -> np.ndarray:
        """With ``tta``, the mean of the probabilities of each image and its mirror image
        (any backend: the outputs are probabilities; fastai's ``tta`` averages them too)."""
        if tta:
            return (self.probabilities(images) + self.probabilities(images[:, :, ::-1])) / 2
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        # uint8 [N,H,W,3] (image layout) → uint8 [N,3,H,W] (the models' layout)
        chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        out = [self.run(chw[i : i + self.batch_size]) for i in range(0, len(chw), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        k = max(1, min(k, probs.shape[1]))
        order = np.argsort(-probs, axis=1)[:, :k]
        names = self.classes
        return [[(names[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]


def top_json(top: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """A prediction's top classes as the CLI's JSON, the server and the Python API give them."""
    return [{"label": label, "probability": round(p, 6)} for label, p in top]


def _to_device(batch: np.ndarray, device) -> Any:
    """uint8 ``[B,3,S,S]`` host array → tensor on ``device``. To a GPU through pinned memory
    with an asynchronous copy: the copy then runs at full PCIe speed, and the host thread
    goes on to queue the model's kernels (the result's ``.cpu()`` is where it waits)."""
    import torch

    x = torch.from_numpy(batch)
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def _torch_runner(model, device, amp_dtype) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    from ..runtime import autocast

    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        x = _to_device(batch, device).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    return run


TORCHSCRIPT_FLAG = "--allow-torchscript-code"


def load(
    path: str | Path,
    *,
    backend: str = ModelOptions.backend,
    device: str = ModelOptions.device,
    precision: str = ModelOptions.precision,
    batch_size: int = PredictOptions.batch_size,
    threads: int | None = ModelOptions.threads,
    allow_code: bool = ModelOptions.allow_code,
    busy_wait: bool = True,
) -> Predictor:
    """Load a checkpoint or an export and validate it; every problem is a one-line UserError.

    TorchScript files are programs (they can read and write files when called), so they load
    only with ``allow_code`` (the CLI's ``--allow-torchscript-code``). Checkpoints load with
    ``weights_only`` and ONNX graphs have no file access, so neither needs it.

    ``busy_wait=False``: ONNX Runtime's threads sleep between calls instead of spinning. Spinning
    is the lowest latency for a model alone, but takes the cycles of decoding processes on the
    same cores: ``predict`` of an int8 model with a decoding worker, 2-core CPU, 509–521 →
    585 img/s without it (BENCHMARKS.md, issue 20).
    """
    path = require_file(path, "model")
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {BACKENDS}")
    kind = detect_backend(path) if backend == "auto" else backend
    if kind == "onnx":
        predictor = _load_onnx(path, batch_size, threads, busy_wait)
    elif kind == "torchscript":
        if not allow_code:
            raise UserError(
                f"{path} is TorchScript, which is code that runs with your permissions (it can "
                f"read and write files); load it only if you trust its source, with "
                f"{TORCHSCRIPT_FLAG}, or use the checkpoint or an ONNX export instead"
            )
        predictor = _load_torchscript(path, device, batch_size, threads)
    else:
        predictor = _load_checkpoint(path, device, precision, batch_size, threads)
    _probe(predictor)
    return predictor


def _probe(predictor: Predictor) -> None:
    """Run two images through the model once: the output must be finite probabilities of
    the size the metadata names. Catches NaN weights in exports, a head that disagrees with
    the class list, and graphs that fail at run time, at load rather than per request."""
    n = len(predictor.meta["classes"])
    images = np.zeros((2, predictor.input_size, predictor.input_size, 3), np.uint8)
    images[1] = 255
    try:
        probs = predictor.probabilities(images)
    except Exception as e:  # a graph that loads but cannot run
        raise UserError(
            f"{predictor.path}: the model fails on a test batch ({first_line(e)})"
        ) from None
    if probs.shape != (2, n):
        raise UserError(
            f"{predictor.path}: the model outputs {probs.shape[1:]} values per image but its "
            f"metadata names {n} classes; the file is damaged or not ours"
        )
    if not np.isfinite(probs).all():
        raise UserError(
            f"{predictor.path}: the model outputs NaN or inf (non-finite weights); "
            "it cannot predict. Use another model file."
        )


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load_torchscript(path: Path, device: str, batch_size: int, threads: int | None) -> Predictor:
    import torch

    from ..runtime import pick_device

    _set_threads(threads)
    dev = pick_device(device)
    files = {"meta.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
            module = torch.jit.load(str(path), map_location=dev, _extra_files=files)
    except Exception as e:
        raise UserError(f"{path}: not a TorchScript export ({first_line(e)})") from None
    meta = validate_meta(_json_meta(files["meta.json"], path, "TorchScript"), str(path))
    module.eval()

    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return module(_to_device(batch, dev)).float().cpu().numpy()

    return Predictor("torchscript", path, meta, run, batch_size, "fp32", dev.type == "cuda")


def _load_checkpoint(
    path: Path, device: str, precision: str, batch_size: int, threads: int | None
) -> Predictor:
    import torch

    from .. import checkpoint
    from ..runtime import pick_device, pick_precision

    _set_threads(threads)
    dev = pick_device(device)
    model, meta = checkpoint.load_model(path, dev)
    model = model.to(memory_format=torch.channels_last)
    amp = pick_precision(precision, dev)
    label = str(amp).replace("torch.", "") if amp else "fp32"
    runner = _torch_runner(model, dev, amp)
    return Predictor("torch", path, meta, runner, batch_size, label, dev.type == "cuda")


def _json_meta(text: str | bytes | None, path: Path, kind: str) -> Any:
    if not text:
        raise UserError(
            f"{path}: {kind} file without cifar10-resnet50 metadata (export it with us)"
        )
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: its cifar10-resnet50 metadata is not valid JSON") from None


def _load_onnx(path: Path, batch_size: int, threads: int | None, busy_wait: bool) -> Predictor:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError("ONNX models need onnxruntime: pip install onnxruntime") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT's warnings are not for our users
    if not busy_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
    except Exception as e:  # ORT raises its own exception types for bad files
        raise UserError(f"{path}: not a readable ONNX model ({first_line(e)})") from None
    props = session.get_modelmeta().custom_metadata_map
    meta = validate_meta(_json_meta(props.get(META_KEY), path, "ONNX"), str(path))
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one input (uint8 images), found {len(inputs)}")
    input_name = inputs[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: batch})[0].astype(np.float32, copy=False)

    on_gpu = session.get_providers()[0] != "CPUExecutionProvider"
    return Predictor("onnx", path, meta, run, batch_size, meta.get("precision", "fp32"), on_gpu)
