"""The Python API, the lr range test, TensorBoard logs, `data show` and the evaluation extras
(top losses, most-confused pairs, plot titles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar10_resnet50 import api, cli
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.training import lr_find

TINY = dict(
    subset=256,
    val_size=100,
    weights="none",
    image_size=32,
    epochs=1,
    batch_size=32,
    device="cpu",
    progress=False,
    optimizer="adamw",
    lr=2e-3,
    test_images=300,  # the test report on 300 stratified images: a full pass is ~30 s
)


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return api.train(data_dir=str(synthetic_root), out=str(out), **TINY)


def test_api_trains_loads_predicts_every_input_kind_and_evaluates(
    tiny_run, synthetic_root, tmp_path
):
    assert tiny_run.best is not None and tiny_run.test is not None
    model = api.load(tiny_run.best)
    assert model.classes[9] == "truck"
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    by_path, by_pil, by_array = model.predict([path, Image.fromarray(array), array], top_k=2)
    assert by_path == by_pil == by_array and len(by_path["top"]) == 2
    batch = model.probabilities(np.stack([array, array[::-1]]))
    assert batch.shape == (2, 10) and np.allclose(batch.sum(1), 1, atol=1e-5)
    report = api.evaluate(
        tiny_run.best, data_dir=synthetic_root, out_dir=tmp_path / "ev", test_images=1000
    )
    assert report.metrics["count"] == 1000 and tiny_run.test.metrics["count"] == 300


def test_api_settings_are_checked_by_name():
    with pytest.raises(UserError, match="unknown setting 'epoch'; did you mean 'epochs'"):
        api.train(epoch=3)
    with pytest.raises(UserError, match="--lr must be positive"):
        api.train(lr=-1.0)
    with pytest.raises(UserError, match="expected a path, a PIL image or a uint8 array"):
        api.Model._pixels([3.14], 32)


def test_lr_sweep_leaves_model_and_optimizer_exactly_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,))
    model(x).sum().backward()
    optimizer.step()  # momentum buffers exist: they must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    lrs, losses = lr_find.sweep(
        model, optimizer, iter([(x, y)] * 50), steps=50, start_lr=1e-4, end_lr=10.0
    )
    assert len(lrs) >= 10 and lrs == sorted(lrs) and all(np.isfinite(losses))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_suggestion_sits_before_the_divergence():
    lrs = list(np.logspace(-6, 1, 71))
    losses = [2.3 - 1.5 / (1 + np.exp(-(np.log10(lr) + 3) * 2)) for lr in lrs]  # falls near 1e-3
    losses = [v if lr < 0.1 else v + 10 * (lr - 0.1) for v, lr in zip(losses, lrs, strict=True)]
    suggested, steepest = lr_find.suggest(lrs, losses)
    at_min = lrs[int(np.argmin(losses))]
    assert suggested == pytest.approx(at_min / 10) and 3e-4 < steepest < 3e-3


def test_lr_find_command_writes_plot_and_json(capsys, synthetic_root, tmp_path):
    code = cli.main(
        ["lr-find", "--data-dir", str(synthetic_root), "--weights", "none", "--image-size", "32",
         "--subset", "128", "--batch-size", "16", "--steps", "12", "--device", "cpu",
         "--out", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "suggested --lr" in out
    saved = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    assert len(saved["lrs"]) == len(saved["losses"]) >= 3
    assert (tmp_path / "lr_find" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_events_hold_step_epoch_and_image_summaries(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run.out_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    for tag in (
        "step/train_loss",
        "step/lr",
        "step/img_per_s",
        "epoch/val_acc",
        "epoch/train_loss",
    ):
        assert tag in tags["scalars"], tags
    assert {"val/confusion", "val/predictions"} <= set(tags["images"])
    assert events.Scalars("epoch/val_acc")[0].value == pytest.approx(tiny_run.best_val_acc)


def test_evaluation_extras_and_titled_curves(tiny_run):
    ev = tiny_run.out_dir / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    confusion = json.loads((ev / "confusion.json").read_text())["rows_true_cols_pred"]
    classes = metrics["classes"]
    top = metrics["most_confused"][0]
    i, j = classes.index(top["true"]), classes.index(top["predicted"])
    off_diagonal = [c for r, row in enumerate(confusion) for k, c in enumerate(row) if r != k]
    assert confusion[i][j] == top["count"] == max(off_diagonal)
    for name in ("top_losses.png", "confusion.png"):
        assert (ev / name).read_bytes()[:4] == b"\x89PNG"
    from cifar10_resnet50.training import metrics as run_metrics

    title = run_metrics.curves_title(
        tiny_run.out_dir, run_metrics.read(tiny_run.out_dir / "metrics.jsonl"), tiny_run.test
    )
    assert title.startswith("run — best epoch 1 (val ") and "test " in title
    assert (tiny_run.out_dir / "curves.png").is_file()


def test_data_show_writes_a_grid_of_augmented_images(capsys, synthetic_root, tmp_path):
    out = tmp_path / "batch.png"
    code = cli.main(
        [
            "data",
            "show",
            "--data-dir",
            str(synthetic_root),
            "--out",
            str(out),
            "--n",
            "16",
            "--mixup",
            "0.4",
        ]
    )
    assert code == 0 and "16 augmented training images" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.format == "PNG"


def test_readme_notebook_example_runs(synthetic_root, tmp_path, monkeypatch):
    """The README's Python example, executed as written (with a tiny run's settings)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(synthetic_root))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert (tmp_path / "photo.jpg").is_file()  # the example makes the file it predicts
    first = namespace["predictions"][0]
    assert first["label"] in namespace["model"].classes


def test_readme_step_wise_example_runs(synthetic_root, tmp_path, monkeypatch):
    """The README's Learner example (its second Python block), executed as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n")[2].split("```")[0]
    assert "api.learner(" in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(synthetic_root))
    namespace: dict = {"api": api}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert [r["epoch"] for r in namespace["learn"].history] == [1, 2, 3]
    assert (tmp_path / "runs" / "steps" / "model.pt").is_file()


def test_api_predictions_have_the_fields_of_the_cli_json(tiny_checkpoint, test_pngs, capsys):
    paths = test_pngs[0][:2]
    assert cli.main(["predict", str(tiny_checkpoint), *map(str, paths), "--format", "json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    from_api = api.load(tiny_checkpoint).predict([str(p) for p in paths], top_k=3)
    assert [row["top"] for row in from_api] == [row["top"] for row in from_cli]
    assert all(row["top"][0] == {"label": row["label"], "probability": row["probability"]}
               for row in from_api)  # fmt: skip


def test_api_train_logs_the_epoch_summary_like_the_cli(synthetic_root, tmp_path, capfd):
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # a fresh notebook: nothing set up (pytest adds its own handlers)
    try:
        api.train(data_dir=str(synthetic_root), download=False, weights="none", image_size=32,
                  epochs=1, subset=32, val_size=20, batch_size=16, device="cpu", progress=False,
                  tensorboard=False, out=str(tmp_path / "run"), test_images=100)  # fmt: skip
    finally:
        root.handlers[:] = saved
        logging.getLogger("cifar10_resnet50").handlers.clear()
    assert "epoch 1/1  train loss" in capfd.readouterr().err
