"""Other backbones (``--arch``, issue 21): any torchvision classification model through its
weights API, its head found and replaced, its preprocessing and facts in the metadata, and
every command on a non-ResNet model. Weights cannot be downloaded here: weights files in each
architecture's torchvision format are written by the tests."""

from __future__ import annotations

import pytest
import torch
import torchvision
from fastapi.testclient import TestClient

from cifar10_resnet50 import checkpoint
from cifar10_resnet50 import config as C
from cifar10_resnet50 import model as model_lib
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.evaluation import evaluate
from cifar10_resnet50.serving import export, inference, predict, serve
from cifar10_resnet50.serving.settings import ServeConfig
from cifar10_resnet50.training import lr_find, train
from test_serve import wait_ready
from test_train import tiny

ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    "resnext50_32x4d", "convnext_tiny", "efficientnet_v2_s", "vit_b_16",
]  # fmt: skip
HEADS = {"convnext_tiny": "classifier.2", "efficientnet_v2_s": "classifier.1",
         "vit_b_16": "heads.head"}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_builds_with_a_new_head_and_rebuilds_from_its_metadata(arch):
    torch.manual_seed(0)
    model = model_lib.build("none", 32, 7, arch=arch).eval()
    assert model.head_name == HEADS.get(arch, "fc")
    assert model.head.out_features == 7 and not model.head.weight.any()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits, features = model(x), model.features(x)
    assert logits.shape == (2, 7) and features.shape == (2, model.head.in_features)
    head = {id(p) for p in model.head.parameters()}
    assert not head & {id(p) for p in model.backbone_parameters()}
    meta = model_lib.model_meta("none", 32, [str(i) for i in range(7)], 32, arch=arch)
    again = model_lib.from_meta(meta)
    again.load_state_dict(model.state_dict())  # the same architecture, key for key


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny", "efficientnet_v2_s", "vit_b_16"])
def test_a_torchvision_weights_file_initialises_the_backbone_of_its_architecture(arch, tmp_path):
    """The 1,000-class ImageNet format, as torchvision writes it: the backbone is loaded (a
    ViT's position embeddings resized from 224 px to ours), the head is new; a file of another
    architecture is refused in one line naming --arch."""
    net = torchvision.models.get_model(arch)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    model = model_lib.build(str(path), 32, 10, arch=arch)
    ours = model.net.state_dict()
    head = {f"{model.head_name}.weight", f"{model.head_name}.bias"}
    for k, v in net.state_dict().items():
        if k in head:
            assert ours[k].shape[0] == 10 and not ours[k].any()
        elif k.endswith("pos_embedding"):
            assert ours[k].shape == (1, (32 // 16) ** 2 + 1, 768)
        else:
            assert torch.equal(ours[k], v), k
    other = "resnet18" if arch != "resnet18" else "convnext_tiny"
    with pytest.raises(UserError, match=f"not a torchvision {other} state dict.*--arch") as e:
        model_lib.load_weights_file(path, other)
    assert "\n" not in str(e.value)


def test_architecture_names_and_sizes_are_checked():
    with pytest.raises(UserError, match="did you mean resnet50"):
        model_lib.check_arch("resnet5")
    with pytest.raises(UserError, match="multiple of 16"):
        C.override(C.Config(), {"model.arch": "vit_b_16", "model.image_size": 40})
    with pytest.raises(UserError, match="no --progressive"):
        C.override(C.Config(), {"model.arch": "vit_b_16", "train.progressive": True})
    assert (
        C.resolve(C.override(C.Config(), {"model.arch": "vit_b_32"}), "cpu").model.image_size == 64
    )


@pytest.fixture(scope="module")
def convnext_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("arch") / "run"
    cfg = tiny(synthetic_root, out, **{"model.arch": "convnext_tiny", "train.epochs": 1})
    return train.run(cfg)


def test_every_command_runs_on_a_non_resnet_model(convnext_run, synthetic_root, tmp_path):
    """ConvNeXt-T (its head is classifier[2], LayerNorm instead of BatchNorm) through train,
    evaluate, predict, both exports with their parity checks, and serve."""
    model, meta = checkpoint.load_model(convnext_run.best)
    assert meta["arch"] == "convnext_tiny" and model.head_name == "classifier.2"
    assert convnext_run.test is not None
    report = evaluate.run(
        convnext_run.best, data_dir=str(synthetic_root), out_dir=tmp_path / "eval", plot=False,
        test_images=100,
    )  # fmt: skip
    assert report.metrics["count"] == 100
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    (pred,) = list(predict.predict_files(inference.load(convnext_run.best), [image], top_k=3))
    assert len(pred.top) == 3
    for fmt in ("onnx", "torchscript"):
        assert export.run(convnext_run.best, fmt, data_dir=synthetic_root, parity_images=8).passed
    app = serve.create_app(lambda: inference.load(convnext_run.best), ServeConfig())
    with TestClient(app) as client:
        wait_ready(client)
        r = client.post("/predict", files={"file": ("a.png", image.read_bytes(), "image/png")})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 5


def test_int8_quantizes_convnext_linear_layers_and_falls_back_when_agreement_drops(
    convnext_run, synthetic_root, tmp_path, monkeypatch, caplog
):
    """ConvNeXt's linear layers are MatMuls by a weight: quantized first; when the result
    misses the agreement bar (here: an impossible one), quantized again with Conv and Gemm
    only, said in a warning, and the report says which file it kept."""
    monkeypatch.setattr(export, "INT8_AGREEMENT", 1.01)
    report = export.run(convnext_run.best, "onnx", int8=True, data_dir=synthetic_root,
                        out=tmp_path / "m.int8.onnx", parity_images=50, calibration_images=32)  # fmt: skip
    # First try: 18 blocks × 2 linear layers quantized; then Conv and Gemm only.
    assert "int8 with 36 MatMuls quantized agrees" in caplog.text
    assert "quantizing Conv and Gemm only" in caplog.text
    assert not report.passed and report.quantized == "Conv, Gemm"
    assert inference.load(report.path).meta["int8_ops"] == "Conv, Gemm"
    assert "FAILED (the bar: 101% top-1 agreement)" in report.table()


def test_linear_probe_and_lr_find_run_on_a_vision_transformer(synthetic_root, tmp_path):
    """The probe's features are what the head takes, for any architecture (768 for ViT-B),
    cached under a key that names the architecture."""
    cfg = tiny(synthetic_root, tmp_path / "probe", **{
        "model.arch": "vit_b_16", "train.strategy": "linear", "data.subset": 48,
        "data.val_size": 16,
    })  # fmt: skip
    result = train.run(cfg, final_eval=False)
    best = checkpoint.load(result.best)
    assert best["model_meta"]["arch"] == "vit_b_16"
    assert best["model"]["net.heads.head.weight"].shape == (10, 768)
    assert best["model"]["net.heads.head.weight"].any()  # fitted
    found = lr_find.run(tiny(synthetic_root, tmp_path / "lf", **{"model.arch": "resnet18"}),
                        steps=3, out_dir=tmp_path / "lf")  # fmt: skip
    assert len(found.lrs) == 3


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_models_build_load_their_weights_files_and_export(name, tmp_path):
    """``--arch timm/NAME`` with timm installed (the ``timm`` extra): its own mean/std, a
    weights file in timm's format, the model rebuilt from its metadata."""
    timm = pytest.importorskip("timm")
    arch = f"timm/{name}"
    size = 32
    reference = timm.create_model(name, img_size=size) if "vit" in name else timm.create_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    model = model_lib.build(str(path), size, 10, arch=arch).eval()
    assert model.head.out_features == 10 and not model.head.weight.any()
    cfg = timm.models.get_pretrained_cfg(name)
    assert tuple(model.preprocess.shift.flatten().tolist()) == pytest.approx(
        [m / s for m, s in zip(cfg.mean, cfg.std, strict=True)]
    )
    meta = model_lib.model_meta(str(path), size, [str(i) for i in range(10)], size, arch=arch)
    again = model_lib.from_meta(meta)
    again.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model(x))
    if "vit" in name:
        with pytest.raises(UserError, match="multiple of 16"):
            C.override(C.Config(), {"model.arch": arch, "model.image_size": 40})
    with pytest.raises(UserError, match="timm has no such model"):
        model_lib.check_arch("timm/no_such_net")


def test_a_timm_model_trains_and_exports_with_parity(synthetic_root, tmp_path):
    pytest.importorskip("timm")
    cfg = tiny(
        synthetic_root, tmp_path / "run", **{"model.arch": "timm/resnet18", "train.epochs": 1}
    )
    result = train.run(cfg, final_eval=False)
    _, meta = checkpoint.load_model(result.best)
    assert meta["arch"] == "timm/resnet18"
    assert export.run(result.best, "onnx", data_dir=synthetic_root, parity_images=8).passed


def test_a_timm_vit_weights_file_for_224_px_loads_at_our_size(tmp_path):
    """A timm ViT's weights are usually for 224 px (a 14×14 grid of patches); at 32 px the grid
    is 2×2: the position embeddings are resampled by timm's own function, as
    ``timm.create_model(pretrained=True, img_size=...)`` does, every other tensor is loaded
    as it is."""
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224")  # 224 px
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    model = model_lib.build(str(path), 32, 10, arch="timm/vit_tiny_patch16_224")
    got, ref = model.net.state_dict(), reference.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 2 * 2, 192) != ref["pos_embed"].shape
    assert torch.equal(got["pos_embed"], resample_abs_pos_embed(ref["pos_embed"], (2, 2)))
    same = [k for k in ref if not k.startswith(("head.", "pos_embed"))]
    assert same and all(torch.equal(got[k], ref[k]) for k in same)
