import hashlib
import urllib.error

import pytest
import torch
import torchvision

from cifar10_resnet50 import model as M
from cifar10_resnet50.data.cifar10 import CLASSES as CIFAR10_CLASSES
from cifar10_resnet50.errors import UserError


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    return torchvision.models.resnet50().state_dict()


def _save_with_hash_name(state, folder):
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"resnet50-{digest[:8]}.pth"  # torchvision's naming
    tmp.rename(path)
    return path


def test_preprocess_converts_normalises_and_resizes():
    pre = M.Preprocess(64, M.IMAGENET_MEAN, M.IMAGENET_STD)
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = pre(x)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    expected = (200 / 255 - torch.tensor(M.IMAGENET_MEAN)) / torch.tensor(M.IMAGENET_STD)
    assert torch.allclose(out[0, :, 10, 10], expected, atol=1e-5)


def test_preprocess_equals_resize_then_normalise():
    pre = M.Preprocess(96, M.IMAGENET_MEAN, M.IMAGENET_STD)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    resized = torch.nn.functional.interpolate(x.float() / 255, size=(96, 96), mode="bilinear")
    mean = torch.tensor(M.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(pre(x), (resized - mean) / std, atol=1e-4)


def test_model_takes_raw_uint8_images_at_any_size():
    net = M.build("none", 32, 10)
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)
        assert net(torch.zeros(1, 3, 50, 70, dtype=torch.uint8)).shape == (1, 10)


def test_weights_file_loads_into_the_backbone_and_head_is_new(tv_state, tmp_path):
    path = _save_with_hash_name(tv_state, tmp_path)
    net = M.build(str(path), 32, 10)
    assert torch.equal(net.net.layer3[0].conv1.weight, tv_state["layer3.0.conv1.weight"])
    assert torch.equal(net.net.bn1.running_mean, tv_state["bn1.running_mean"])
    assert net.net.fc.weight.shape == (10, 2048)
    assert torch.count_nonzero(net.net.fc.weight) == 0
    assert M.model_meta(str(path), 32, CIFAR10_CLASSES, 32)["weights"] == f"file {path.name}"


def test_weights_file_with_wrong_hash_in_name_is_rejected(tv_state, tmp_path):
    path = tmp_path / "resnet50-0123abcd.pth"
    torch.save(tv_state, path)
    with pytest.raises(UserError, match="sha256"):
        M.build(str(path), 32, 10)


def test_weights_file_with_prefixed_keys_is_rejected_with_a_hint(tv_state, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in tv_state.items()}, path)
    with pytest.raises(UserError, match="prefix such as 'module.'"):
        M.build(str(path), 32, 10)


def test_weights_file_with_wrong_shapes_is_rejected(tv_state, tmp_path):
    bad = dict(tv_state)
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(UserError, match="shapes differ"):
        M.build(str(path), 32, 10)


@pytest.mark.parametrize("payload", [b"garbage", b""])
def test_unreadable_weights_file_is_a_user_error(tmp_path, payload):
    path = tmp_path / "w.pth"
    path.write_bytes(payload)
    with pytest.raises(UserError, match="cannot load"):
        M.build(str(path), 32, 10)


def test_weights_file_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": torchvision.models.resnet18}, path)
    with pytest.raises(UserError, match="cannot load"):
        M.build(str(path), 32, 10)


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        M.build(str(tmp_path / "nope.pth"), 32, 10)


def test_offline_imagenet_download_names_the_offline_options(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    for spec in ("imagenet", "imagenet-v1"):
        with pytest.raises(UserError) as info:
            M.build(spec, 32, 10)
        text = str(info.value)
        assert "--weights PATH" in text and "--weights none" in text and "\n" not in text


def test_imagenet_spec_uses_torchvision_hash_checked_download(monkeypatch, tv_state):
    seen = {}

    def fake(self, *args, **kwargs):
        seen["weights"], seen["check_hash"] = self, kwargs.get("check_hash")
        return tv_state

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake)
    M.build("imagenet", 32, 10, progress=False)
    assert seen == {
        "weights": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        "check_hash": True,
    }
    M.build("imagenet-v1", 32, 10, progress=False)
    assert seen["weights"] == torchvision.models.ResNet50_Weights.IMAGENET1K_V1


def test_weights_none_never_downloads(monkeypatch):
    def boom(self, *a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", boom)
    assert M.model_meta("none", 32, CIFAR10_CLASSES, 32)["weights"].startswith("none")
    M.build("none", 32, 10)
