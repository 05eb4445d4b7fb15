"""Imbalanced own images (issue 21): ``--class-weights auto`` weighs the loss by inverse class
frequency; ``--balanced-sampling`` draws every class equally often. Both keyed and exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifar10_resnet50 import config as C
from cifar10_resnet50.data import augment
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.runtime import Process
from cifar10_resnet50.training import core, trainer
from test_train import tiny


def test_balanced_epochs_draw_every_class_about_equally_and_replay_exactly():
    labels = torch.tensor([0] * 900 + [1] * 100)
    order = augment.epoch_order(1000, seed=3, epoch=1, labels=labels)
    assert torch.equal(order, augment.epoch_order(1000, seed=3, epoch=1, labels=labels))
    share = float((labels[order] == 1).float().mean())
    assert 0.43 < share < 0.57  # 0.1 without balancing; binomial sd 0.016
    plain = augment.epoch_order(1000, seed=3, epoch=1)
    assert sorted(plain.tolist()) == list(range(1000))  # the default stays a permutation

    x = torch.randint(0, 256, (1000, 3, 8, 8), dtype=torch.uint8)
    rows = torch.arange(0, 1000, 2)  # picked rows: 450 of class 0, 50 of class 1
    seen = torch.cat([
        yb for _, _, yb, _ in augment.train_batches(
            x, labels, batch_size=50, seed=0, epoch=0, rows=rows, balanced=True
        )
    ])  # fmt: skip
    assert len(seen) == 500 and 0.4 < float(seen.float().mean()) < 0.6


def test_class_weights_are_sklearns_balanced_and_weigh_the_steps_loss(synthetic_root, tmp_path):
    cfg = C.resolve(
        tiny(synthetic_root, tmp_path / "run", **{"train.class_weights": "auto"}), "cpu"
    )
    t = trainer.build(cfg, tmp_path / "run", Process.from_env("cpu"))
    labels = t.split.arrays.train_y[t.batches.rows]
    counts = torch.bincount(labels, minlength=10).float()
    expected = len(labels) / (10 * counts)
    assert torch.allclose(t.recipe.class_weights, expected)
    assert t.recipe.class_weights.max() > t.recipe.class_weights.min()  # an uneven subset

    _, xb, yb, target = next(t.batches.epoch(0))
    with torch.no_grad():
        t.model.train()
        logits = t.model(xb)
    loss, _ = core.train_step(t.model, t.model, t.opt, t.recipe, xb, target)
    manual = F.cross_entropy(logits, yb, weight=expected, label_smoothing=0.1)
    assert float(loss) == pytest.approx(float(manual), rel=1e-4)


def test_imbalance_settings_are_checked():
    with pytest.raises(UserError, match="use one"):
        C.override(C.Config(), {"train.class_weights": "auto", "train.balanced_sampling": True})
    with pytest.raises(UserError, match="linear probe"):
        C.override(C.Config(), {"train.balanced_sampling": True, "train.strategy": "linear"})
