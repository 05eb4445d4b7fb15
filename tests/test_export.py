import numpy as np
import onnx
import pytest
import torch

from cifar10_resnet50 import checkpoint
from cifar10_resnet50.cli import main
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.serving import export, inference


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    return {
        fmt: export.run(
            tiny_checkpoint,
            fmt,
            out=folder / f"m.{fmt}",
            data_dir=synthetic_root,
            parity_images=300,
        )
        for fmt in ("torchscript", "onnx")
    }


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_passes_parity_on_test_images(exports, fmt):
    report = exports[fmt]
    assert report.passed
    p = report.parity
    assert p.images == 300 and p.source == "CIFAR-10 test images"
    assert p.top1_agreement == 1.0 and p.max_abs_diff <= export.PROB_TOLERANCE
    assert p.accuracy_eager == p.accuracy_export
    assert "parity check: passed" in report.table()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_take_uint8_at_any_batch_and_carry_their_metadata(exports, tiny_checkpoint, fmt):
    predictor = inference.load(exports[fmt].path, allow_code=True)
    assert predictor.backend == fmt
    assert predictor.classes[0] == "airplane" and predictor.meta["image_size"] == 32
    model, _ = checkpoint.load_model(tiny_checkpoint)
    rng = np.random.default_rng(0)
    for n in (1, 7):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        with torch.no_grad():
            eager = torch.softmax(model(torch.from_numpy(x).permute(0, 3, 1, 2)), 1).numpy()
        got = predictor.probabilities(x)
        assert got.shape == (n, 10) and np.abs(got - eager).max() < 1e-4


def test_onnx_is_one_self_contained_file_with_dynamic_batch(exports):
    path = exports["onnx"].path
    proto = onnx.load(str(path))
    assert [p.key for p in proto.metadata_props] == [inference.META_KEY]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert list(path.parent.glob("*.data")) == []  # no external weight files


def test_int8_export_reports_accuracy_and_speed(tiny_checkpoint, synthetic_root, tmp_path):
    report = export.run(
        tiny_checkpoint,
        "onnx",
        int8=True,
        out=tmp_path / "m.int8.onnx",
        data_dir=synthetic_root,
        parity_images=200,
        calibration_images=64,
    )
    predictor = inference.load(report.path)
    assert predictor.precision == "int8" and predictor.backend == "onnx"
    assert set(report.speed) == {"onnxruntime fp32", "onnxruntime int8"}
    assert all(v > 0 for v in report.speed.values())
    assert report.parity.accuracy_export is not None and 0 <= report.parity.top1_agreement <= 1
    quantized = [n for n in onnx.load(str(report.path)).graph.node if n.op_type == "QuantizeLinear"]
    assert quantized  # really int8


def test_failed_parity_makes_the_cli_exit_1(
    tiny_checkpoint, synthetic_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(export, "PROB_TOLERANCE", -1.0)  # nothing can pass
    code = main(
        [
            "export",
            str(tiny_checkpoint),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "m.onnx"),
            "--data-dir",
            str(synthetic_root),
            "--parity-images",
            "50",
        ]
    )
    assert code == 1 and "parity check: FAILED" in capsys.readouterr().out


def test_bad_export_requests_are_user_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--int8 is for --format onnx"):
        export.run(tiny_checkpoint, "torchscript", int8=True)
    bogus = tmp_path / "x.onnx"
    bogus.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        inference.load(bogus)
