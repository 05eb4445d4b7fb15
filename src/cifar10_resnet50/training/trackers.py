"""Experiment trackers besides TensorBoard (``--tracker mlflow`` / ``wandb``): the run's
settings once, the loss, lr and img/s at each host sync (every ``LOG_EVERY`` steps: no extra
GPU stall), each epoch's metrics row and the final test report. Only the main process logs;
nothing is imported unless chosen.

* MLflow: to ``RUN_DIR/mlruns`` (a local file store; ``mlflow ui --backend-store-uri
  RUN_DIR/mlruns``), or wherever ``MLFLOW_TRACKING_URI`` points (a server, a database).
* Weights & Biases: offline into ``RUN_DIR/wandb`` (``wandb sync RUN_DIR/wandb/offline-run-*``
  uploads it), or online when ``WANDB_MODE=online`` (or an API key is set).

A resumed run continues the same tracker run (its id is kept in ``RUN_DIR/trackers.json``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..config import flat
from ..errors import UserError
from .callbacks import Callback

log = logging.getLogger(__name__)

EXPERIMENT = "cifar10-resnet50"
ROW_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s")


def _import(name: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(
            f"--tracker {extra} needs {name}: pip install 'cifar10-resnet50[{extra}]'"
        ) from e


class _Ids:
    """The tracker runs' ids of a run folder, so a resumed run logs into the same one."""

    def __init__(self, out: Path):
        self.path = out / "trackers.json"

    def get(self, name: str) -> str | None:
        if not self.path.is_file():
            return None
        return json.loads(self.path.read_text()).get(name)

    def put(self, name: str, run_id: str) -> None:
        ids = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.path.write_text(json.dumps({**ids, name: run_id}, indent=2))


class Tracker(Callback):
    """The loop's hooks, turned into ``log(metrics, step)`` calls of a backend."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def sync(self, trainer: Any, state: Any, loss: float, img_per_s: float) -> None:
        self.log({"step/train_loss": loss, "step/lr": trainer.opt.lr,
                  "step/img_per_s": img_per_s}, state.step)  # fmt: skip

    def epoch_end(self, trainer: Any, state: Any, row: dict[str, Any], val_logits: Any) -> None:
        values = {f"epoch/{k}": row[k] for k in ROW_KEYS if row.get(k) is not None}
        self.log({**values, "epoch/index": row["epoch"]}, row["step"])

    def finish(self, test: dict[str, Any] | None, step: int) -> None:
        """The test report's headline figures, then close the run."""


class MLflow(Tracker):
    def __init__(self, out: Path, config: dict[str, Any]):
        mlflow = _import("mlflow", "mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps the file store (what a local run needs: no server, no database)
            # behind this switch; a tracking URI of the user's own goes elsewhere.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(EXPERIMENT)
        ids = _Ids(out)
        resumed = ids.get("mlflow")
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=resumed, run_name=None if resumed else out.name)
        if resumed is None:
            ids.put("mlflow", self.run.info.run_id)
            mlflow.log_params({k: str(v) for k, v in flat(config).items()})
        log.info("MLflow run %s (%s)", self.run.info.run_id, mlflow.get_tracking_uri())

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, test: dict[str, Any] | None, step: int) -> None:
        if test:
            self.log({f"test/{k}": v for k, v in test.items()}, step)
        self.mlflow.end_run()


class WandB(Tracker):
    def __init__(self, out: Path, config: dict[str, Any]):
        wandb = _import("wandb", "wandb")
        online = os.environ.get("WANDB_MODE") == "online" or (
            "WANDB_MODE" not in os.environ and bool(os.environ.get("WANDB_API_KEY"))
        )
        ids = _Ids(out)
        resumed = ids.get("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT), name=out.name, dir=str(out),
            config=config, id=resumed, resume="allow" if resumed else None,
            mode="online" if online else "offline",
        )  # fmt: skip
        if resumed is None:
            ids.put("wandb", self.run.id)
        log.info("W&B run %s (%s, %s)", self.run.id, "online" if online else "offline", out)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, test: dict[str, Any] | None, step: int) -> None:
        if test:
            self.run.summary.update({f"test/{k}": v for k, v in test.items()})
        self.run.finish()


def open_trackers(names: str, out: Path, config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``--tracker`` names besides TensorBoard (``mlflow``, ``wandb``)."""
    chosen = {n.strip() for n in names.split(",")}
    return [kind(out, config) for name, kind in (("mlflow", MLflow), ("wandb", WandB))
            if name in chosen]  # fmt: skip
