"""Tests on the real CIFAR-10 copy ($CIFAR10_DATA_DIR). Skipped without it, except under CI."""

import pytest
import torch

from cifar10_resnet50 import checkpoint, data
from cifar10_resnet50.data import cifar10
from cifar10_resnet50.evaluation import evaluate
from cifar10_resnet50.runtime import pick_precision

pytestmark = pytest.mark.real_data


def test_real_copy_verifies_and_loads(real_root):
    report = cifar10.verify(real_root)
    assert report.kind in ("official", "structure")
    arrays = cifar10.load(real_root)
    assert arrays.train_x.shape == (50000, 3, 32, 32) and arrays.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(arrays.train_y).tolist() == [5000] * 10
    # Real photos, not noise: neighbouring pixels are strongly correlated.
    x = arrays.test_x[:500].float()
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


def test_short_run_from_scratch_learns_well_above_chance(real_root, real_trained):
    """The session's short run (4,000 images, 2 epochs at 32 px, random init; see conftest)."""
    result = real_trained
    assert result.best_val_acc > 0.25  # chance is 0.10

    # The saved model reproduces that accuracy on the validation images through evaluate.
    model, meta = checkpoint.load_model(result.best)
    arrays = cifar10.load(real_root)
    _, val_idx = data.stratified_split(arrays.train_y, 1000, seed=0)
    logits = evaluate.predict_logits(
        model,
        arrays.train_x[val_idx],
        batch_size=500,
        device=torch.device("cpu"),
        amp_dtype=pick_precision("auto", torch.device("cpu")),  # as training validated
    )
    acc = evaluate.metrics(logits, arrays.train_y[val_idx], 10)["accuracy"]
    assert acc == pytest.approx(result.best_val_acc, abs=0.01)
    assert meta["image_size"] == 32
