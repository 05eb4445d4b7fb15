"""Bulk prediction on a Ray cluster: Ray Data reads the files, stateless tasks decode them on
every CPU of the cluster, and actors run the model (one model load per actor, on a CPU or a
GPU), results written as Parquet or JSON lines. Needs the ``ray`` extra
(``pip install -e ".[ray]"``).

Why a function and not ``predict --engine ray``: a Ray job is a Python driver that a cluster
runs (``ray job submit -- python label.py``), and what makes it fast is Ray's own: the
cluster's address, how many actors, GPUs per actor, autoscaling, where the files and results
live (local, NFS, S3, GCS). A flag would either hide those or copy Ray's options one by one;
a function takes them as Ray spells them and the README shows the three-line driver. On one
machine without Ray, ``predict`` (worker processes, ``--shard K/N`` for array jobs) is the
tool.

    import ray
    from cifar10_resnet50.serving import ray_predict

    ray.init()  # or ray.init(address="auto") inside a cluster job
    ray_predict.predict("runs/x/best.int8.onnx", ["/data/photos"], "/data/preds", actors=8)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .files import image_extensions

FORMATS = ("parquet", "jsonl")


def _require_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(
            'the Ray path needs Ray Data: pip install -e ".[ray]" (or pip install "ray[data]")'
        ) from None
    return ray


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A Ray Data batch of files (``bytes``, ``path``) → uint8 ``[n,size,size,3]`` pixels,
    each image's width and height, and "" or the reason it cannot be used. Stateless: Ray runs
    it as tasks on every CPU, apart from the model's actors."""
    from ..images import ImageError, decode

    n = len(batch["path"])
    pixels = np.zeros((n, size, size, 3), np.uint8)
    width, height, error = np.zeros(n, np.int64), np.zeros(n, np.int64), []
    for i, (data, path) in enumerate(zip(batch["bytes"], batch["path"], strict=True)):
        try:
            decoded = decode(bytes(data), str(path), size=size)
            pixels[i], (width[i], height[i]) = decoded.pixels, decoded.original_size
            error.append("")
        except ImageError as e:
            error.append(str(e))
    return {"path": batch["path"], "pixels": pixels, "width": width, "height": height,
            "error": np.array(error, dtype=object)}  # fmt: skip


class Classify:
    """The model in a Ray actor: loaded once in ``__init__``, then called per batch."""

    def __init__(self, model: str, top_k: int, load_options: dict[str, Any]):
        from .inference import load

        self.predictor = load(model, **load_options)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        """Decoded batch → an Arrow table, one row per file; Arrow, not numpy, because the
        top-k columns are lists (empty for a file that could not be used)."""
        import pyarrow as pa

        good = np.flatnonzero(batch["error"] == "")
        n = len(batch["path"])
        labels: list[list[str]] = [[] for _ in range(n)]
        probs: list[list[float]] = [[] for _ in range(n)]
        if len(good):
            p = self.predictor.probabilities(batch["pixels"][good])
            for i, top in zip(good, self.predictor.top_k(p, self.top_k), strict=True):
                labels[i] = [label for label, _ in top]
                probs[i] = [round(float(q), 6) for _, q in top]
        return pa.table({
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "width": pa.array(batch["width"], pa.int64()),
            "height": pa.array(batch["height"], pa.int64()),
            "label": pa.array([row[0] if row else None for row in labels], pa.string()),
            "probability": pa.array([row[0] if row else None for row in probs], pa.float64()),
            "top_labels": pa.array(labels, pa.list_(pa.string())),
            "top_probabilities": pa.array(probs, pa.list_(pa.float64())),
            "error": pa.array([str(e) for e in batch["error"]], pa.string()),
        })  # fmt: skip


def predict(
    model: str | Path,
    paths: list[str] | str,
    output: str,
    *,
    fmt: str = "parquet",
    top_k: int = 3,
    batch_size: int = 64,
    actors: int = 1,
    gpus_per_actor: float = 0,
    load_options: dict[str, Any] | None = None,
) -> None:
    """Predict every image file under ``paths`` (files or folders, local or any file system
    Ray reads) into ``output`` (a folder of Parquet or JSON-lines files, one row per file:
    path, width, height, label, probability, top_labels, top_probabilities, error — the
    error's reason where the file could not be used, "" otherwise). ``actors`` model copies,
    each with ``gpus_per_actor`` GPUs (device ``cuda`` then), ``load_options`` as
    :func:`inference.load` takes them. Runs on the Ray instance already started
    (``ray.init``), else starts a local one. Returns the written Dataset's row count."""
    ray = _require_ray()
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}")
    from .inference import load

    options = dict(load_options or {})
    if gpus_per_actor:
        options.setdefault("device", "cuda")
    size = load(model, **options).input_size  # fails here, once, if the model is unusable
    ds = ray.data.read_binary_files(
        paths, include_paths=True, file_extensions=[e.lstrip(".") for e in image_extensions()]
    )
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": size}, batch_size=batch_size,
                        batch_format="numpy")  # fmt: skip
    ds = ds.map_batches(
        Classify, fn_constructor_kwargs={"model": str(model), "top_k": top_k,
                                         "load_options": options},
        batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=gpus_per_actor,
    )  # fmt: skip
    # Writing runs the pipeline, streaming: files are read, decoded, classified and written
    # batch by batch across the cluster, never held all at once.
    if fmt == "parquet":
        ds.write_parquet(output)
    else:
        ds.write_json(output)
