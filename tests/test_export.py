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
    assert report.quantized == predictor.meta["int8_ops"] == "Conv, Gemm"  # ResNet: no MatMul


class _Attention(torch.nn.Module):
    """A transformer block in miniature: uint8 images [B,3,4,4] → 16 tokens of 3 values,
    linear layers on tokens (exported as MatMul by a weight) and attention's two MatMuls of
    activations (Q·Kᵀ, A·V)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(3, 8) for _ in range(3))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = images.float().flatten(2).transpose(1, 2) / 255  # [B,16,3]
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)  # [B,16,8]
        attention = torch.softmax(q @ k.transpose(1, 2), -1)  # [B,16,16]
        return torch.softmax(self.head((attention @ v).mean(1)), -1)  # [B,10]


def _matmul_inputs(path) -> list[tuple[bool, bool]]:
    """Each MatMul node of an ONNX file → (by a weight: an input is a stored tensor, int8 or
    not; quantized: an input is dequantized int8)."""
    graph = onnx.load(str(path)).graph
    stored = {t.name for t in graph.initializer}
    made_by = {out: n for n in graph.node for out in n.output}

    def dequantized(x: str) -> bool:
        return x in made_by and made_by[x].op_type == "DequantizeLinear"

    def weight(x: str) -> bool:
        return x in stored or (dequantized(x) and made_by[x].input[0] in stored)

    return [
        (any(weight(x) for x in n.input), any(dequantized(x) for x in n.input))
        for n in graph.node
        if n.op_type == "MatMul"
    ]


@pytest.mark.parametrize("matmuls", [True, False])
def test_int8_quantizes_linear_layers_but_never_attentions_products(tmp_path, matmuls):
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(export._onnx_proto(_Attention().eval(), {"input_size": 4}).SerializeToString())
    calibration = np.random.default_rng(0).integers(0, 256, (64, 3, 4, 4), dtype=np.uint8)
    ops, count = export._quantize_int8(fp32, tmp_path / "q.onnx", calibration, {}, matmuls)
    found = _matmul_inputs(tmp_path / "q.onnx")
    by_weight = [quantized for weight, quantized in found if weight]
    by_activation = [quantized for weight, quantized in found if not weight]
    assert len(by_weight) == 3 and len(by_activation) == 2  # q, k, v (head: Gemm); Q·Kᵀ, A·V
    assert not any(by_activation)  # attention stays fp32
    assert all(quantized == matmuls for quantized in by_weight)
    assert (ops, count) == (("Conv, Gemm, MatMul by a weight", 3) if matmuls else ("Conv, Gemm", 0))


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
