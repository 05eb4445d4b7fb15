"""Weight EMA (``--ema DECAY``, issue 21): timm's warm-up, BatchNorm statistics averaged too,
and the averaged weights are what the run validates, keeps as best.pt and reports on."""

from __future__ import annotations

import json

import pytest
import torch

from cifar10_resnet50 import checkpoint, config
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.evaluation import evaluate
from cifar10_resnet50.training import ema, train
from test_train import tiny


def test_the_average_follows_timms_warmed_up_decay_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = ema.WeightAverage(model, decay=0.99)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items() if v.is_floating_point()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.train()(torch.randn(4, 3))  # BatchNorm's running statistics and batch count move
        decay = min(0.99, 1 - (1 + step) ** -0.75)  # 0, 0.405, 0.561: far below 0.99 early on
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * model.state_dict()[k]
        avg.update(model)
    got = avg.module.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert int(got["1.num_batches_tracked"]) == 3  # copied, not averaged
    assert ema.decay_at(0.99, 10**6) == 0.99 and not avg.module.training

    again = ema.WeightAverage(model, decay=0.99)
    again.load_state_dict(avg.state_dict())
    assert again.updates == 3
    assert all(torch.equal(again.module.state_dict()[k], got[k]) for k in got)


def test_validation_and_best_pt_use_the_averaged_weights(synthetic_root, tmp_path):
    out = tmp_path / "run"
    result = train.run(tiny(synthetic_root, out, **{"train.ema": 0.9}), final_eval=False)
    last = checkpoint.load(result.last)
    averaged = last["train_state"]["ema"]["weights"]
    assert last["train_state"]["ema"]["updates"] == 8  # 2 epochs × 4 steps
    assert any(not torch.equal(averaged[k], last["model"][k]) for k in averaged)

    from cifar10_resnet50 import data
    from cifar10_resnet50.model import from_meta

    arrays = data.load("cifar10", data_dir=str(synthetic_root), download=False)
    val = torch.tensor(json.loads((out / "splits.json").read_text())["val"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def val_loss(weights):
        model = from_meta(last["model_meta"])
        model.load_state_dict(weights)
        logits = evaluate.predict_logits(
            model, arrays.train_x[val], batch_size=50, device=torch.device("cpu"),
            amp_dtype=None,
        )  # fmt: skip
        return float(torch.nn.functional.cross_entropy(logits, arrays.train_y[val]))

    assert rows[-1]["val_loss"] == pytest.approx(val_loss(averaged), rel=1e-4)
    assert rows[-1]["val_loss"] != pytest.approx(val_loss(last["model"]), rel=1e-4)
    best = checkpoint.load(out / "best.pt")
    best_epoch = best["metrics"]["epoch"]
    assert best["metrics"]["val_loss"] == rows[best_epoch - 1]["val_loss"]
    if best_epoch == 2:
        assert all(torch.equal(best["model"][k], averaged[k]) for k in averaged)


def test_without_a_validation_split_best_pt_holds_the_final_average(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(synthetic_root, out, **{"train.ema": 0.9, "data.val_size": 0})
    result = train.run(cfg, final_eval=False)
    averaged = checkpoint.load(result.last)["train_state"]["ema"]["weights"]
    best = checkpoint.load(out / "best.pt")["model"]
    assert all(torch.equal(best[k], averaged[k]) for k in averaged)


def test_ema_is_checked_and_refused_for_the_linear_probe():
    with pytest.raises(UserError, match="--ema is a decay"):
        config.override(config.Config(), {"train.ema": 1.0})
    with pytest.raises(UserError, match="drop --ema"):
        config.override(config.Config(), {"train.ema": 0.99, "train.strategy": "linear"})
