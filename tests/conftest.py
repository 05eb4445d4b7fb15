"""Shared fixtures: a synthetic CIFAR-10 folder in the official format, and the real copy."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cifar10_resnet50.data import cifar10
from cifar10_resnet50.data.cifar10 import CLASSES as CIFAR10_CLASSES

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_folder(root: Path, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` exactly as the official pickles are laid out.

    Pixels are random except for a class-dependent brightness, so the data is learnable.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.repeat(np.arange(10), 1000)
        rng.shuffle(labels)
        data = rng.integers(0, 128, size=(10000, 3072), dtype=np.uint8)
        data += (labels * 12).astype(np.uint8)[:, None]
        batch = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"{i}.png" for i in range(10000)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072}, f)
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only-by-convention synthetic data folder shared by the whole session."""
    return write_cifar_folder(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def synthetic_copy(tmp_path, synthetic_root) -> Path:
    """A private copy that a test may damage."""
    import shutil

    dest = tmp_path / "data"
    shutil.copytree(synthetic_root, dest)
    return dest


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    # Tests never touch the user's caches, and never find real ImageNet weights by accident.
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("CIFAR10_RESNET50_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real CIFAR-10 copy from $CIFAR10_DATA_DIR; under CI=true its absence fails."""
    value = os.environ.get("CIFAR10_DATA_DIR")
    path = Path(value) if value else None
    if path is None or not (path / "cifar-10-batches-py" / "batches.meta").is_file():
        message = f"real CIFAR-10 copy not found (CIFAR10_DATA_DIR={value!r})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must point CIFAR10_DATA_DIR at ../shared/cifar10")
        pytest.skip(message)
    return path


@pytest.fixture
def no_data_env(monkeypatch):
    """Tests that pass --data-dir explicitly must not fall back to the real copy."""
    monkeypatch.delenv("CIFAR10_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint at 32 px with a random (not zero) head, so predictions differ per image."""
    import torch

    from cifar10_resnet50 import checkpoint
    from cifar10_resnet50 import model as M

    torch.manual_seed(0)
    net = M.build("none", 32, 10)
    with torch.no_grad():
        net.net.fc.weight.normal_(0, 0.05)
        net.net.fc.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    checkpoint.save(
        path,
        {
            "model_meta": M.model_meta("none", 32, CIFAR10_CLASSES, 32),
            "model": net.state_dict(),
            "config": {},
        },
    )
    return path


def _write_pngs(root: Path, folder: Path, n: int) -> tuple[list[Path], object]:
    """The first ``n`` test images of the data under ``root`` as PNG files named by label."""
    from PIL import Image

    arrays = cifar10.load(root)
    paths = []
    for i in range(n):
        path = folder / f"test{i:02d}_{arrays.classes[arrays.test_y[i]]}.png"
        Image.fromarray(arrays.test_x[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths, arrays.test_x[:n]


@pytest.fixture(scope="session")
def test_pngs(tmp_path_factory, synthetic_root):
    """The first 24 synthetic test images as PNG files, with their uint8 tensors."""
    return _write_pngs(synthetic_root, tmp_path_factory.mktemp("pngs"), 24)


@pytest.fixture(scope="session")
def real_pngs(real_root, tmp_path_factory) -> list[Path]:
    """The first 32 real CIFAR-10 test images as PNG files."""
    return _write_pngs(real_root, tmp_path_factory.mktemp("real_pngs"), 32)[0]
