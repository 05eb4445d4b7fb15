"""Experiment trackers (``--tracker``, issue 21): MLflow to a local store and W&B offline,
each with the run's settings, per-sync and per-epoch metrics and the test report; a resumed
run logs into the same tracker run; nothing is imported unless chosen."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cifar10_resnet50 import config as C
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.training import train
from test_train import tiny


def test_mlflow_gets_params_metrics_and_the_test_report_and_a_resume_continues_its_run(
    synthetic_root, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    cfg = tiny(
        synthetic_root, out, **{"train.tracker": "mlflow,tensorboard", "train.tensorboard": True}
    )
    train.run(cfg, stop_after_steps=4)  # epoch 1, then stopped
    train.run(cfg, resume=True)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.data.params["optim.optimizer"] == "sgd" and run.data.params["train.epochs"] == "2"
    val = client.get_metric_history(run_id, "epoch/val_acc")
    assert [m.step for m in val] == [4, 8]  # both epochs, in the one run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in val] == [r["val_acc"] for r in rows]
    assert client.get_metric_history(run_id, "step/train_loss")
    assert run.data.metrics["test/count"] == 200
    assert run.data.metrics["test/accuracy"] >= 0
    assert (out / "tensorboard").is_dir()  # both, as asked
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_wandb_logs_an_offline_run_into_the_run_folder(synthetic_root, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = tiny(synthetic_root, out, **{"train.tracker": "wandb", "train.tensorboard": True})
    train.run(cfg, final_eval=False)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    assert runs[0].name == f"run-{run_id}.wandb"
    # The run log is W&B's protobuf stream; the metric names and settings are in it as text.
    blob = runs[0].read_bytes()
    assert b"epoch/val_acc" in blob and b"step/train_loss" in blob and b"optim" in blob
    assert not (out / "tensorboard").exists()  # only what was asked for


def test_trackers_are_checked_and_none_is_imported_unless_chosen():
    with pytest.raises(UserError, match="--tracker 'comet'"):
        C.override(C.Config(), {"train.tracker": "comet"})
    with pytest.raises(UserError, match="or none"):
        C.override(C.Config(), {"train.tracker": "none,mlflow"})
    code = (
        "import sys, cifar10_resnet50.training.train as t, cifar10_resnet50.cli;"
        "print(any(m in sys.modules for m in ('mlflow', 'wandb')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
