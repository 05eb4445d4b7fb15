"""The options of ``evaluate`` and ``compare``, each declared once with its flag, help text,
default and range (``config.setting``): the CLI's parsers and the API's defaults derive from
these. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PRECISIONS, data_dir_setting, device_setting, test_images_setting
from ..declare import setting
from ..serving.settings import allow_code_setting


@dataclass(frozen=True)
class EvaluateOptions:
    data_source: str | None = setting(
        None,
        "--data",
        "cifar10, folder:PATH or csv:FILE (default: the data the model was trained on, as its metadata "
        "records)",
        metavar="SOURCE",
    )
    data_dir: str | None = data_dir_setting()
    out_dir: str | None = setting(
        None,
        "--out",
        "where metrics.json, confusion.{json,png}, top_losses.png, reliability.png (and "
        "robustness.{json,png}) go (default: MODEL's folder/eval)",
        metavar="DIR",
    )
    test_images: int | None = test_images_setting()
    tta_flip: bool = setting(False, "--tta", "average with horizontally flipped images")
    corruptions: bool = setting(
        False,
        "--corruptions",
        "also the CIFAR-10-C sweep: 15 corruptions × 5 severities, generated on the fly",
    )
    corruption_images: int | None = setting(
        None,
        "--corruption-images",
        "stratified test images for the sweep (default: 2000 on a CPU, all 10000 on a GPU)",
        low=1,
        metavar="N",
    )
    seed: int = setting(0, "--seed", "corruptions' randomness")
    allow_code: bool = allow_code_setting()
    device: str = device_setting()
    precision: str = setting(
        "auto",
        "--precision",
        "auto: bf16 where fast (as training); fp32 for bit-exact comparisons",
        choices=PRECISIONS,
    )
    batch_size: int = setting(500, "--batch-size", "images per model call", low=1)


@dataclass(frozen=True)
class CompareOptions:
    out: str = setting("compare", "--out", "compare.json/.png go here", metavar="DIR")
    corruption_images: int = setting(
        500, "--corruption-images", "stratified test images per corrupted set", low=1,
        metavar="N",
    )  # fmt: skip
    test_images: int | None = test_images_setting()
    data_dir: str | None = data_dir_setting()
    allow_code: bool = allow_code_setting()
