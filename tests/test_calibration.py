"""Calibration scores against hand-computed values, and temperature scaling (issue 8)."""

import math

import pytest
import torch

from cifar10_resnet50.data import cifar10
from cifar10_resnet50.evaluation import calibration as cal


def test_wilson_interval_matches_the_textbook_values():
    low, high = cal.wilson(8, 10)  # p = 0.8, n = 10: (0.4902, 0.9433) in every table
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)
    assert cal.wilson(0, 20)[0] == 0.0 and cal.wilson(20, 20)[1] == 1.0
    narrow = cal.wilson(9000, 10000)
    assert narrow[1] - narrow[0] == pytest.approx(2 * 1.96 * math.sqrt(0.09 / 10000), rel=0.01)
    assert cal.wilson(0, 0) == (0.0, 1.0)


def test_ece_is_the_count_weighted_gap_between_confidence_and_accuracy():
    # Two images at 0.9 confidence (one right), two at 0.65 (both right), 15 bins:
    # (2/4)·|0.5 − 0.9| + (2/4)·|1.0 − 0.65| = 0.2 + 0.175.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.35, 0.65]])
    labels = torch.tensor([0, 1, 0, 1])
    assert cal.ece(probs, labels) == pytest.approx(0.375)
    bins = cal.reliability(probs, labels)
    assert len(bins) == 15 and sum(b.count for b in bins) == 4
    full = [b for b in bins if b.count]
    assert [(b.count, b.accuracy) for b in full] == [(2, 1.0), (2, 0.5)]
    assert full[1].confidence == pytest.approx(0.9)


def test_brier_and_nll_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    labels = torch.tensor([0, 1])
    assert cal.brier(probs, labels) == pytest.approx((0.02 + 1.62) / 2)
    logits = torch.log(probs)
    assert cal.nll(logits, labels) == pytest.approx(-(math.log(0.9) + math.log(0.1)) / 2)


def test_temperature_scaling_cools_an_overconfident_model_and_keeps_its_accuracy():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (4000,))
    logits = torch.randn(4000, 10)
    logits[torch.arange(4000), labels] += 1.5  # ~60 % right...
    logits *= 8  # ...but near-certain every time
    t = cal.fit_temperature(logits[:2000], labels[:2000])
    assert t > 3
    before, after = (
        cal.scores(logits[2000:], labels[2000:]),
        cal.scores(logits[2000:], labels[2000:], t),
    )
    assert after["nll"] < before["nll"] * 0.6 and after["ece"] < before["ece"] / 3
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def _calibrated_checkpoint(tiny_checkpoint, tmp_path, temperature):
    from cifar10_resnet50 import checkpoint

    blob = checkpoint.load(tiny_checkpoint)
    blob["model_meta"] = {**blob["model_meta"], "temperature": temperature}
    path = tmp_path / "calibrated.pt"
    checkpoint.save(path, blob)
    return path


def test_temperature_travels_from_checkpoint_to_exports_predict_and_evaluate(
    tiny_checkpoint, synthetic_root, tmp_path
):
    import numpy as np

    from cifar10_resnet50 import checkpoint
    from cifar10_resnet50.evaluation import evaluate
    from cifar10_resnet50.serving import export, inference

    images = cifar10.load(synthetic_root).test_x[:32]  # uint8 [32,3,32,32]
    model, _ = checkpoint.load_model(tiny_checkpoint)  # no temperature: as before issue 8
    with torch.no_grad():
        raw = model.net(model.preprocess(images))
    assert float(model.temperature) == 1.0
    path = _calibrated_checkpoint(tiny_checkpoint, tmp_path, 0.25)
    expected = torch.softmax(raw / 0.25, 1).numpy()
    hwc = images.permute(0, 2, 3, 1).numpy()
    for source in (path, export.run(path, "onnx", data_dir=synthetic_root, parity_images=50).path):
        predictor = inference.load(source)
        assert predictor.meta["temperature"] == 0.25
        np.testing.assert_allclose(predictor.probabilities(hwc), expected, atol=2e-4)
    report = evaluate.run(path, data_dir=synthetic_root, out_dir=tmp_path / "eval", test_images=500)
    c = report.metrics["calibration"]
    assert c["temperature"] == 0.25 and "before_scaling" in c
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 1000
    assert "ECE" in report.table() and "95% CI" in report.table()


def test_a_bad_temperature_in_a_model_file_is_a_one_line_error(tiny_checkpoint, tmp_path):
    from cifar10_resnet50.errors import UserError
    from cifar10_resnet50.serving import inference

    path = _calibrated_checkpoint(tiny_checkpoint, tmp_path, -1.0)
    with pytest.raises(UserError, match="'temperature' is -1.0"):
        inference.load(path)


def test_training_fits_a_temperature_on_the_validation_split(synthetic_root, tmp_path):
    from cifar10_resnet50 import checkpoint
    from cifar10_resnet50.training import train
    from test_train import tiny

    result = train.run(tiny(synthetic_root, tmp_path / "r", **{"data.val_size": 200}))
    t = checkpoint.load(result.best)["model_meta"]["temperature"]
    assert t > 0 and t != 1.0
    assert result.test.metrics["calibration"]["temperature"] == pytest.approx(t)
    no_val = train.run(
        tiny(synthetic_root, tmp_path / "n", **{"data.val_size": 0}), final_eval=False
    )
    assert "temperature" not in checkpoint.load(no_val.last)["model_meta"]
