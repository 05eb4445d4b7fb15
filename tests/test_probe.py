"""`--strategy linear` on cached backbone features (issue 7, requirements 1–3)."""

from __future__ import annotations

import json

import torch

from cifar10_resnet50 import checkpoint
from cifar10_resnet50 import config as C
from cifar10_resnet50 import model as model_lib
from cifar10_resnet50.data import cifar10
from cifar10_resnet50.serving import inference
from cifar10_resnet50.training import probe, train


def _cfg(root, out, **changes):
    settings = {
        "data.data_dir": str(root),
        "data.subset": 64,
        "data.val_size": 20,
        "model.weights": "none",
        "model.image_size": 32,
        "train.strategy": "linear",
        "train.epochs": 1,
        "train.device": "cpu",
        "train.progress": False,
        "train.out": str(out),
    }
    settings.update(changes)
    return C.override(C.Config(), settings)


def _row(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_features_are_cached_and_reused_only_when_every_key_matches(
    synthetic_root, tmp_path, caplog, monkeypatch
):
    # A cache of its own: the session's cache may already hold these features from another test
    # in this process (the first run below must compute them; CI failed on that once).
    monkeypatch.setenv("CIFAR10_RESNET50_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="cifar10_resnet50"):
        first = train.run(_cfg(synthetic_root, tmp_path / "a"), final_eval=False)
    assert _row(first.out_dir)["probe"]["features_from_cache"] is False
    # The start line says what the probe does, not "1 epochs × 15 steps" it never runs.
    assert "linear probe of resnet50" in caplog.text and "epochs ×" not in caplog.text
    again = train.run(_cfg(synthetic_root, tmp_path / "b"), final_eval=False)
    assert _row(again.out_dir)["probe"]["features_from_cache"] is True
    a, b = checkpoint.load(first.best)["model"], checkpoint.load(again.best)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same features, same head
    for i, change in enumerate(
        ({"model.image_size": 40}, {"train.seed": 1}, {"train.probe_mirrors": True})
    ):
        other = train.run(_cfg(synthetic_root, tmp_path / f"c{i}", **change), final_eval=False)
        assert _row(other.out_dir)["probe"]["features_from_cache"] is False, change


def test_changed_data_or_weights_file_never_reuses_features(synthetic_copy, tmp_path):
    train.run(_cfg(synthetic_copy, tmp_path / "a"), final_eval=False)
    from test_data import _rewrite_batch  # a changed copy of the data: another digest

    labels = (torch.arange(10000) % 10).tolist()
    _rewrite_batch(synthetic_copy / "cifar-10-batches-py" / "data_batch_5", labels=labels)
    changed = train.run(_cfg(synthetic_copy, tmp_path / "b"), final_eval=False)
    assert _row(changed.out_dir)["probe"]["features_from_cache"] is False
    assert probe.weights_identity("none", 0) != probe.weights_identity("none", 1)
    w = tmp_path / "w.pth"
    w.write_bytes(b"one")
    first = probe.weights_identity(str(w), 0)
    w.write_bytes(b"two")
    assert probe.weights_identity(str(w), 0) != first


def test_a_damaged_feature_cache_is_recomputed(synthetic_root, tmp_path, caplog):
    cache = tmp_path / "features"
    model = model_lib.build("none", 32, 10, progress=False)

    arrays = cifar10.load(synthetic_root)
    idx = torch.arange(40)
    kw = dict(
        key_parts={"k": 1}, device=torch.device("cpu"), amp_dtype=None, batch_size=20,
        flip=True, cache_dir=cache,
    )  # fmt: skip
    first = probe.cached_features(model, arrays, idx, **kw)
    (path,) = cache.glob("features-*.pt")
    blob = torch.load(path, weights_only=True)
    blob["plain"][0, 0] += 1  # one changed value, right key
    torch.save(blob, path)
    again = probe.cached_features(model, arrays, idx, **kw)
    assert not again.cached and "damaged" in caplog.text
    assert torch.equal(again.plain, first.plain) and torch.equal(again.flipped, first.flipped)
    assert probe.cached_features(model, arrays, idx, **kw).cached


def test_the_probe_checkpoint_is_a_whole_model_for_predict_and_export(
    synthetic_root, tmp_path, test_pngs
):
    from cifar10_resnet50.serving import export

    result = train.run(_cfg(synthetic_root, tmp_path / "r"), final_eval=False)
    predictor = inference.load(result.best)
    paths, tensors = test_pngs
    probs = predictor.probabilities(tensors[:4].permute(0, 2, 3, 1).numpy())
    assert probs.shape == (4, 10)
    report = export.run(result.best, "onnx", data_dir=synthetic_root, parity_images=50)
    assert report.passed
    # ...and a fine-tune starts from its backbone (BatchNorm statistics included), head fresh
    from cifar10_resnet50 import model as M

    tuned = M.build(str(result.best), 32, 10)
    probe_state = checkpoint.load(result.best)["model"]
    for k, v in tuned.state_dict().items():
        if k.startswith("net.") and not k.startswith("net.fc."):
            assert torch.equal(v, probe_state[k]), k
    assert not tuned.net.fc.weight.any()


def test_the_fitted_head_separates_separable_features():
    torch.manual_seed(0)
    centers = torch.randn(3, 2048) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 2048)
    for solver in probe.SOLVERS:
        head = probe.fit_head(x[:240], y[:240], x[240:], y[240:], 3, solver, mirrored_x=x[:240])
        assert head.val_acc == 1.0 and head.train_acc == 1.0, solver
        logits = x @ head.weight.T + head.bias  # the folded head works on raw features
        assert (logits.argmax(1) == y).all(), solver
