"""The model facts that travel inside every model file, and their validation.

A checkpoint's ``model_meta``, a TorchScript export's ``meta.json`` and an ONNX export's
``cifar10_resnet50`` property all hold the same dict (written by ``model.model_meta``). A file
from elsewhere, or a damaged one, may hold anything: :func:`validate_meta` checks it once,
at load, so that no command meets a missing key or a wrong type later (an ``IndexError`` deep
in ``top_k``, a 500 in the server after ``/readyz`` said ready).

No torch here: the ONNX path of predict and serve runs without it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import UserError

MAX_CLASSES = 100_000
IMAGE_SIZE_RANGE = (16, 1024)
# Files written before models took other input sizes were all CIFAR-10 models: uint8 32×32.
LEGACY_INPUT_SIZE = 32


def validate_meta(meta: Any, source: str) -> dict[str, Any]:
    """``meta`` if it describes a model we can run; else a one-line UserError naming the key."""

    def fail(problem: str) -> UserError:
        return UserError(f"{source}: model metadata {problem}; the file is damaged or not ours")

    if not isinstance(meta, dict):
        raise fail("is missing" if meta is None else f"is a {type(meta).__name__}, not a table")
    for key in ("arch", "num_classes", "classes", "image_size", "mean", "std"):
        if key not in meta:
            raise fail(f"lacks '{key}'")
    arch = meta["arch"]
    if not isinstance(arch, str) or not re.fullmatch(r"(timm/)?[a-z][a-z0-9_.]{0,95}", arch):
        raise fail(f"names architecture {arch!r}, not a torchvision model name")
    n = meta["num_classes"]
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_CLASSES:
        raise fail(f"'num_classes' is {n!r}; it must be a whole number from 2 to {MAX_CLASSES:,}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise fail("'classes' is not a list of names")
    if len(classes) != n:
        raise fail(f"names {len(classes)} classes for a {n}-way model")
    size = meta["image_size"]
    low, high = IMAGE_SIZE_RANGE
    if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
        raise fail(f"'image_size' is {size!r}; it must be a whole number from {low} to {high}")
    for key in ("mean", "std"):
        v = meta[key]
        ok = (
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and all(math.isfinite(x) for x in v)
        )
        if not ok:
            raise fail(f"'{key}' is {v!r}; it must be 3 finite numbers")
    if any(x <= 0 for x in meta["std"]):
        raise fail("'std' must be positive")
    meta.setdefault("input_size", LEGACY_INPUT_SIZE)
    size = meta["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
        raise fail(f"'input_size' is {size!r}; it must be a whole number from {low} to {high}")
    data = meta.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("source"), str)):
        raise fail("'data' does not name a data source")
    t = meta.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
        raise fail(f"'temperature' is {t!r}; it must be a positive number")
    weights = meta.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise fail("'weights' is not text")
    return meta
