"""Bulk prediction on Ray Data (issue 20, requirement 5b), on a local Ray instance."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cifar10_resnet50.errors import UserError
from cifar10_resnet50.serving import inference, predict, ray_predict
from test_bulk_predict import _write_images


def _ray_or_skip():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail('Ray is part of the dev extra: pip install -e ".[dev]"')
        pytest.skip("ray[data] is not installed")
    return ray


def test_ray_data_predicts_every_file_as_predict_does(tiny_checkpoint, tmp_path):
    ray = _ray_or_skip()
    paths = _write_images(tmp_path / "imgs", 10, bad=(4,))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)  # fmt: skip
    try:
        ray_predict.predict(tiny_checkpoint, [str(tmp_path / "imgs")], str(tmp_path / "out"),
                            fmt="jsonl", batch_size=4, load_options={"threads": 1})  # fmt: skip
    finally:
        ray.shutdown()
    rows = [json.loads(line) for f in sorted((tmp_path / "out").glob("*.json"))
            for line in f.read_text().splitlines()]  # fmt: skip
    by_path = {os.path.realpath(r["path"]): r for r in rows}
    assert sorted(by_path) == sorted(os.path.realpath(p) for p in paths)  # each file once
    expected = predict.predict_files(inference.load(tiny_checkpoint), paths, top_k=3)
    for result in expected:
        row = by_path[os.path.realpath(result.path)]
        if isinstance(result, predict.Rejected):
            assert row["label"] is None and "damaged or truncated" in row["error"]
            continue
        assert row["error"] == "" and (row["width"], row["height"]) == (result.width, result.height)
        assert row["top_labels"] == [label for label, _ in result.top]
        np.testing.assert_allclose(row["top_probabilities"], [p for _, p in result.top], atol=1e-5)


def test_the_ray_path_refuses_an_unknown_format(tiny_checkpoint, tmp_path):
    _ray_or_skip()
    with pytest.raises(UserError, match="format must be one of"):
        ray_predict.predict(tiny_checkpoint, [str(tmp_path)], str(tmp_path / "o"), fmt="csv")
