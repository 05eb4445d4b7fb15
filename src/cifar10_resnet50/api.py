"""The Python API, for notebooks and scripts: the same functions the command line calls.

```python
from cifar10_resnet50 import api

run = api.train(epochs=1, weights="none", image_size=32, optimizer="adamw", lr=2e-3)
model = api.load(run.best)                      # a checkpoint, ONNX or TorchScript file
model.predict(["cat.jpg", pil_image, array])    # [{"label": ..., "top": [...]}, ...]
report = api.evaluate(run.best)                 # test accuracy, per class, confusion
api.lr_find(weights="none", image_size=32)      # the learning-rate range test

learn = api.learner(weights="none", image_size=32, out="runs/steps")  # step by step
learn.freeze(); learn.fit(1, lr=0.05)           # the head alone, then
learn.unfreeze(); learn.fit(2, lr=0.01)         # every layer, a schedule per fit
learn.evaluate(); learn.save("model.pt")
```

Settings are the config's fields by name (``lr``, ``epochs``, ``weights``; see
``config.py`` or ``cifar10-resnet50 train --help``), or a whole :class:`Config` / config file.
The data ``source`` may also be a pandas DataFrame with a path and a label column (and
optionally a split column), as in a ``csv:`` list: ``api.train(source=frame, epochs=3)``.
Errors are :class:`~cifar10_resnet50.errors.UserError` with the same one-line messages as the
CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import config as config_lib
from .config import Config
from .errors import UserError
from .options import LrFindOptions


def _config(config: Config | str | Path | None, settings: dict[str, Any]) -> Config:
    frames = {k: v for k, v in settings.items() if k in ("source", "data.source")
              and hasattr(v, "itertuples")}  # a pandas DataFrame: path, label columns  # fmt: skip
    if frames:
        from .data import cache, table

        tables = cache.user_cache_dir() / "tables"
        settings = {**settings, **{k: table.from_frame(v, tables) for k, v in frames.items()}}
    if config is None:
        base = Config()
    elif isinstance(config, Config):
        base = config
    else:
        base = config_lib.load_file(config)
    return config_lib.with_settings(base, settings)


def train(
    config: Config | str | Path | None = None,
    *,
    resume: bool = False,
    started: float | None = None,
    **settings: Any,
):
    """Train (or ``resume`` the run in ``out``); returns ``train.TrainResult`` (``.best``,
    ``.last``, ``.out_dir``, ``.test`` the final test report). ``started``: the
    ``time.perf_counter()`` a ``budget`` counts from (default: this call). Progress and the
    epoch summaries are logged as the CLI prints them (to stderr) unless the caller has set
    up logging itself."""
    from .training import train as train_lib

    _log_like_the_cli()
    return train_lib.run(_config(config, settings), resume=resume, started=started)


def learner(
    config: Config | str | Path | None = None, *, out: str | Path | None = None, **settings: Any
):
    """A run to drive step by step (``training.learner.Learner``: ``fit(epochs, lr)``,
    ``freeze()``, ``unfreeze()``, ``evaluate()``, ``save(path)``, ``history``), with these
    settings (``epochs`` is given to each ``fit``), in ``out``."""
    from .training.learner import Learner

    _log_like_the_cli()
    return Learner.create(_config(config, settings), out)


def _log_like_the_cli() -> None:
    """A notebook has no logging set up: show the package's INFO lines (epoch summaries, the
    plan, the final report) as the CLI does. A caller's own logging set-up wins."""
    import logging
    import sys

    package = logging.getLogger("cifar10_resnet50")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def lr_find(
    config: Config | str | Path | None = None,
    *,
    steps: int = LrFindOptions.steps,
    start_lr: float = LrFindOptions.start_lr,
    end_lr: float = LrFindOptions.end_lr,
    **settings: Any,
):
    """The learning-rate range test for the run these settings describe."""
    from .training import lr_find as lr_find_lib

    cfg = _config(config, settings)
    return lr_find_lib.run(cfg, steps=steps, start_lr=start_lr, end_lr=end_lr)


def evaluate(checkpoint: str | Path, **options: Any):
    """Test-set report of a checkpoint (``evaluate.run``'s options: ``data_dir``, ``out_dir``,
    ``device``, ``precision``, ``batch_size``, ``tta_flip``)."""
    from .evaluation import evaluate as evaluate_lib

    return evaluate_lib.run(checkpoint, **options)


@dataclass
class Model:
    """A loaded model file; ``predict`` takes paths, PIL images and uint8 arrays."""

    predictor: Any  # inference.Predictor

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @property
    def meta(self) -> dict[str, Any]:
        return self.predictor.meta

    @staticmethod
    def _pixels(images: Any, size: int) -> np.ndarray:
        """Paths, PIL images or uint8 arrays → uint8 ``[N,size,size,3]`` (the model's input)."""
        from . import images as images_lib

        if isinstance(images, np.ndarray) and images.ndim == 4:  # a batch [N,H,W,3]
            items: list[Any] = list(images)
        elif isinstance(images, (list, tuple)):
            items = list(images)
        else:
            items = [images]
        decoded = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                decoded.append(images_lib.read_file(item, size=size))
            elif isinstance(item, np.ndarray):
                decoded.append(images_lib.from_array(item, f"array {i}", size=size))
            elif hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
                decoded.append(images_lib.from_pil(item, f"image {i}", size=size))
            else:
                raise UserError(
                    f"item {i}: expected a path, a PIL image or a uint8 array, "
                    f"got {type(item).__name__}"
                )
        if not decoded:
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([d.pixels for d in decoded])

    def probabilities(self, images: Any, tta: bool = False) -> np.ndarray:
        """float32 ``[N, classes]`` for one image or a list/batch of them; ``tta``: averaged
        with each image's mirror image (``predict --tta``)."""
        return self.predictor.probabilities(self._pixels(images, self.predictor.input_size), tta)

    def predict(self, images: Any, top_k: int = 3, tta: bool = False) -> list[dict[str, Any]]:
        """For each image: ``{"label": top-1 class, "probability": p, "top": [{"label",
        "probability"}, ...]}``, the same fields as the CLI's ``--format json`` and the
        server's ``/predict``."""
        from .serving.inference import top_json

        if top_k < 1:
            raise UserError("top_k must be at least 1")
        probs = self.probabilities(images, tta)
        rows = [top_json(top) for top in self.predictor.top_k(probs, top_k)]
        return [{**row[0], "top": row} for row in rows]


def load(
    path: str | Path,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int = 64,
    allow_torchscript_code: bool = False,
) -> Model:
    """Load and validate a checkpoint, an ONNX export or (opted in) a TorchScript export."""
    from .serving import inference

    return Model(
        inference.load(
            path,
            device=device,
            precision=precision,
            batch_size=batch_size,
            allow_code=allow_torchscript_code,
        )
    )
