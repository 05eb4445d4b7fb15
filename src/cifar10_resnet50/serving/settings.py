"""The options of the commands that use a model file — ``predict``, ``export``, ``serve`` —
each declared once with its flag, help text, default and range (``config.setting``): the CLI's
parsers, the API's defaults and the checks derive from these. No torch here: ``--help`` and
flag checking stay instant."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import device_setting
from ..declare import setting
from ..images import MAX_BYTES, MAX_DECODE_SECONDS, MAX_PIXELS

BACKENDS = ("auto", "torch", "torchscript", "onnx")
# A model file runs in fp32 unless asked: exact answers; bf16 is faster on CPUs that have it.
PRECISIONS = ("auto", "fp32", "bf16")
PREDICT_FORMATS = ("table", "json", "csv", "jsonl")
EXPORT_FORMATS = ("torchscript", "onnx")


def allow_code_setting() -> bool:
    """``--allow-torchscript-code``, for every command that may load a TorchScript file."""
    return setting(
        False,
        "--allow-torchscript-code",
        "load a TorchScript model: it is a program that runs with your permissions (it can "
        "read and write files), so only for files you trust",
    )


@dataclass(frozen=True)
class ModelOptions:
    """How a model file is loaded and run (``inference.load``): predict and serve."""

    backend: str = setting("auto", "--backend", "by file type unless given", choices=BACKENDS)
    device: str = device_setting("cpu")
    precision: str = setting(
        "fp32",
        "--precision",
        "for checkpoints (bf16 is faster on CPUs that have it)",
        choices=PRECISIONS,
    )
    threads: int | None = setting(
        None, "--threads", "CPU threads (default: all cores)", low=1, metavar="N"
    )
    allow_code: bool = allow_code_setting()


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = setting(
        3, "--top-k", "classes per image; more than the model has shows all", low=1
    )
    format: str = setting("table", "--format", "output format", choices=PREDICT_FORMATS)
    output: str | None = setting(
        None, "--output", "write results here instead of stdout ('-': stdout)", metavar="FILE"
    )
    batch_size: int = setting(64, "--batch-size", "images per model call", low=1)
    tta: bool = setting(
        False,
        "--tta",
        "average the probabilities of each image and its mirror image (2× the model's work)",
    )
    workers: int | None = setting(
        None,
        "--workers",
        "decoding processes, overlapped with the model (default: the cores the model leaves "
        "free, at least 1; 0 decodes in this process)",
        low=0,
        metavar="N",
    )
    resume: bool = setting(
        False,
        "--resume",
        "continue an interrupted run from its --output FILE.partial (same command otherwise)",
    )
    shard: str | None = setting(
        None,
        "--shard",
        "predict only part K of N of the files (1-based; e.g. a SLURM array's index): N runs "
        "with the same arguments cover every file exactly once",
        metavar="K/N",
    )


@dataclass(frozen=True)
class ExportOptions:
    fmt: str = setting(
        None,
        "--format",
        "onnx (runs anywhere ONNX Runtime does; --int8 for speed) or torchscript",
        choices=EXPORT_FORMATS,
        required=True,
    )
    int8: bool = setting(
        False, "--int8", "ONNX Runtime static int8 quantization, calibrated on training images"
    )
    out: str | None = setting(
        None,
        "--out",
        "default: beside the checkpoint (.torchscript.pt, .onnx, .int8.onnx)",
        metavar="FILE",
    )
    data_dir: str | None = setting(
        None,
        "--data-dir",
        "CIFAR-10 for the parity check and calibration (a folder model uses its folder)",
        metavar="DIR",
    )
    parity_images: int | None = setting(
        None, "--parity-images", "default 1000; int8: the whole test set (0 = all)", low=0,
        metavar="N",
    )  # fmt: skip
    calibration_images: int = setting(
        1000,
        "--calibration-images",
        "int8: training images that calibrate activation ranges",
        low=1,
        metavar="N",
    )


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``serve``'s service. ``low`` / ``above`` are the flags' range checks
    (value ≥ low, or > above)."""

    host: str = setting(
        "127.0.0.1", "--host", "address to listen on (default 127.0.0.1: this machine only)"
    )
    port: int = setting(8000, "--port", "TCP port (default 8000)", low=1, high=65535)
    max_body_mb: float = setting(
        MAX_BYTES / 2**20, "--max-body-mb", "request body limit in MiB", above=0
    )
    max_pixels: int = setting(
        MAX_PIXELS, "--max-pixels", "per image, checked from the header", low=1
    )
    # Sum of header pixels of one request's images; beyond this: 413 before any decoding
    # (32 near-limit images in one request took 2.3 GB and 59 s before this bound).
    max_request_pixels: int = setting(
        2 * MAX_PIXELS, "--max-request-pixels", "all images of one request together", low=1
    )
    max_files: int = 64  # images in one request
    max_batch: int = setting(32, "--max-batch", "images per model call", low=1)
    # 0 (greedy) measured best here: with 5 ms, throughput at concurrency 1 halved, and under
    # load batches fill while the model runs anyway.
    max_wait_ms: float = setting(
        0.0,
        "--max-wait-ms",
        "extra wait for a fuller batch (0: batches form while the model runs)",
        low=0,
    )
    queue_images: int = setting(256, "--queue-size", "images waiting before 503", low=1)
    # From the first byte read to the answer; beyond it the request's remaining work is dropped.
    timeout_s: float = setting(
        30.0,
        "--timeout",
        "seconds per request (upload, decoding, queue, model) before 504",
        above=0,
    )
    top_k: int = 5
    decode_timeout_s: float = setting(
        MAX_DECODE_SECONDS, "--decode-timeout", "seconds to decode one image before 422", above=0
    )
    # Each decoding thread may hold a 50 MP image (150 MB).
    decode_workers: int | None = setting(
        None,
        "--decode-workers",
        "images decoded at once across requests (default: the CPU cores)",
        low=1,
        metavar="N",
    )
    # One line per request (client, method, path, status) on stderr, as web servers do; off
    # for the last few percent of throughput in a load test.
    access_log: bool = setting(True, "--no-access-log", "no line per request on stderr")
    # uvicorn's httptools parser has no limit of its own: a 64 MiB header was accepted.
    max_header_kb: int = setting(
        64, "--max-header-kb", "request line + headers in KiB before 431", low=1
    )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kb * 1024
