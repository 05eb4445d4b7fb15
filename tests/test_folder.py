"""Training on a folder of the user's own images (``--data folder:PATH``), end to end.

The folder is generated from synthetic CIFAR-10-format test images, written as PNG and JPEG at
mixed sizes and modes into class folders, next to files that cannot be used. Stored at 40 px,
so anything that still assumed CIFAR-10's 32 px would fail here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cifar10_resnet50 import config as C
from cifar10_resnet50 import data
from cifar10_resnet50.data import cifar10, folder
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.evaluation import evaluate
from cifar10_resnet50.serving import export, inference, predict, serve
from cifar10_resnet50.serving.settings import ServeConfig
from cifar10_resnet50.training import train
from corpus import huge_header_png
from test_serve import wait_ready

CLASSES = ("airplane", "automobile", "bird")
PER_CLASS = 24
STORE = 40

# Exactly what the report must list for the folder below, sorted by path.
EXPECTED_REPORT = [
    "airplane/notes.txt: not an image Pillow can read",
    "automobile/broken.jpg: damaged or truncated JPEG data (OSError: image file is truncated "
    "(110 bytes not processed))",
    "automobile/empty.png: empty file (0 bytes)",
    "bird/huge.png: 144,000,000 pixels exceeds the limit of 50,000,000",
    "empty/: empty class: no usable images",
    "lonely/: class with one usable image; needs 2",
    "readme.md: not inside a class folder",
]


def _save(array: np.ndarray, path: Path, i: int) -> None:
    """Image ``i`` in one of several forms: PNG or JPEG, RGB/L/RGBA, 32 px or larger and not
    square (so the centred square and Lanczos resize are exercised)."""
    im = Image.fromarray(array)
    if i % 3 == 1:
        im = im.resize((64 + i, 48), Image.Resampling.BICUBIC)
    if i % 4 == 2:
        im = im.convert("L")
    if i % 5 == 3:
        im = im.convert("RGBA")
    if i % 2:
        im.convert("RGB").save(path.with_suffix(".jpg"), quality=95)
    else:
        im.save(path.with_suffix(".png"))


def write_image_folder(root: Path, synthetic_root: Path) -> Path:
    arrays = cifar10.load(synthetic_root)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        idx = torch.nonzero(arrays.test_y == c).flatten()[:PER_CLASS]
        for i, j in enumerate(idx.tolist()):
            _save(arrays.test_x[j].permute(1, 2, 0).numpy(), root / name / f"img{i:02d}", i)
    (root / "airplane" / "notes.txt").write_text("not an image")
    good = (root / "automobile" / "img00.png").read_bytes()
    jpeg = (root / "automobile" / "img01.jpg").read_bytes()
    (root / "automobile" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "automobile" / "empty.png").write_bytes(b"")
    (root / "bird" / "huge.png").write_bytes(huge_header_png(12000, 12000))  # refused unread
    (root / "automobile" / ".DS_Store").write_bytes(b"\0\0junk")  # hidden: skipped silently
    (root / "lonely").mkdir()
    (root / "lonely" / "only.png").write_bytes(good)
    (root / "empty").mkdir()
    (root / "readme.md").write_text("my photos")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, synthetic_root) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("photos") / "photos", synthetic_root)


@pytest.fixture
def folder_copy(tmp_path, image_folder) -> Path:
    import shutil

    dest = tmp_path / "photos"
    shutil.copytree(image_folder, dest)
    return dest


def test_classes_counts_and_the_exact_report(image_folder):
    arrays, report = folder.load(image_folder, store_size=STORE, workers=1, progress=False)
    assert arrays.classes == CLASSES
    assert report.lines() == EXPECTED_REPORT
    assert list(arrays.left_out) == EXPECTED_REPORT
    assert arrays.train_x.dtype == torch.uint8 and arrays.train_x.shape[1:] == (3, STORE, STORE)
    assert arrays.image_size == STORE
    n = 3 * PER_CLASS
    assert len(arrays.train_y) + len(arrays.test_y) == n
    # A tenth held out, stratified: 7 of 72, at least 2 of every class.
    assert len(arrays.test_y) == n // 10
    assert torch.bincount(arrays.test_y, minlength=3).min() >= 2
    assert set(arrays.train_files).isdisjoint(arrays.test_files)
    assert arrays.source == f"folder:{image_folder.resolve()}"
    assert "3 classes (airplane, automobile, bird)" in report.summary()


def test_pixels_follow_the_documented_resize_policy(image_folder):
    """The stored pixels are exactly what the predict path makes of the same file."""
    from cifar10_resnet50 import images

    arrays, _ = folder.load(image_folder, store_size=STORE, workers=1, progress=False)
    name = arrays.train_files[0]
    expected = images.read_file(image_folder / name, size=STORE).pixels
    assert np.array_equal(arrays.train_x[0].permute(1, 2, 0).numpy(), expected)


def test_decoding_in_worker_processes_equals_decoding_here(image_folder, tmp_path):
    one, _ = folder.load(image_folder, store_size=STORE, workers=1, progress=False)
    many, _ = folder.load(
        image_folder, store_size=STORE, workers=2, progress=False, cache_dir=tmp_path
    )
    assert torch.equal(one.train_x, many.train_x) and torch.equal(one.test_y, many.test_y)


def test_the_cache_is_used_and_rebuilt_when_a_file_changes_or_is_added(folder_copy, monkeypatch):
    """A hit decodes nothing; a changed or added file is decoded alone, the rest reused."""
    calls = []
    real = folder.decode_all
    monkeypatch.setattr(
        folder,
        "decode_all",
        lambda root, names, *a: calls.append(list(names)) or real(root, names, *a),
    )

    def load(size=STORE):
        return folder.load(folder_copy, store_size=size, workers=1, progress=False)[0]

    first = load()
    everything = len(calls[0])
    assert everything == 3 * PER_CLASS + 5  # every candidate file, the 5 bad ones included
    assert torch.equal(load().train_x, first.train_x) and len(calls) == 1  # a cache hit
    target = folder_copy / "bird" / "img00.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)  # changed content
    os.utime(target, ns=(1, 1))
    changed = load()
    assert calls[1] == ["bird/img00.png"]
    files = changed.train_files + changed.test_files
    pixels = torch.cat([changed.train_x, changed.test_x])[files.index("bird/img00.png")]
    assert int(pixels.max()) == 0  # the new pixels, not the cached ones
    (folder_copy / "bird" / "new.png").write_bytes(target.read_bytes())  # a new file
    grown = load()
    assert calls[2] == ["bird/new.png"]
    assert len(grown.train_y) + len(grown.test_y) == 3 * PER_CLASS + 1
    fresh = folder.load(
        folder_copy, store_size=STORE, workers=1, progress=False, cache_dir=folder_copy.parent / "c"
    )[0]
    assert torch.equal(fresh.train_x, grown.train_x) and torch.equal(fresh.test_x, grown.test_x)
    # A different stored size is another cache entry, decoded in full.
    other = load(STORE + 8)
    assert len(calls[-1]) == everything + 1 and other.image_size == STORE + 8


def test_strict_refuses_and_fewer_than_two_classes_is_one_line(folder_copy, tmp_path):
    with pytest.raises(UserError, match=r"7 file\(s\) or class\(es\) unusable with --strict"):
        folder.load(folder_copy, store_size=STORE, strict=True, workers=1, progress=False)
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    for i in range(3):
        (one / "cat" / f"{i}.png").write_bytes((folder_copy / "bird" / "img00.png").read_bytes())
    with pytest.raises(UserError, match="1 usable class folder") as e:
        folder.load(one, store_size=STORE, workers=1, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such folder"):
        data.check(f"folder:{tmp_path / 'missing'}", None)
    with pytest.raises(UserError, match="cifar10, folder:PATH"):
        data.check("imagenet", None)


def test_train_test_val_layout(image_folder, tmp_path):
    root = tmp_path / "split"
    for split, names in (("train", CLASSES), ("val", CLASSES), ("test", (*CLASSES, "zebra"))):
        for name in names:
            (root / split / name).mkdir(parents=True)
            src = image_folder / (name if name != "zebra" else "bird")
            files = sorted(p for p in src.iterdir() if p.name.startswith("img"))
            part = {"train": files[:12], "val": files[12:16], "test": files[16:20]}[split]
            for f in part:
                (root / split / name / f.name).write_bytes(f.read_bytes())
    (root / "extra").mkdir()
    arrays, report = folder.load(root, store_size=STORE, workers=1, progress=False)
    assert arrays.classes == CLASSES
    assert report.lines() == [
        "extra/: ignored: with train/, only train/, val/ and test/ are read",
        "test/zebra/: class not trained (train/)",
    ]
    assert len(arrays.test_y) == 12 and not report.held_out_test
    train_idx, val_idx = arrays.split(None, seed=3)
    assert sorted(arrays.train_files[i].split("/")[0] for i in val_idx) == ["val"] * 12
    assert len(train_idx) == 36
    with pytest.raises(UserError, match="own val/ folder"):
        arrays.split(5, seed=3)
    with pytest.raises(UserError, match="--test-size is for folders without one"):
        folder.load(root, store_size=STORE, test_size=5, workers=1, progress=False)


def test_stratified_split_is_proportional_for_unbalanced_classes():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 2)
    kept, held = data.stratified_split(labels, 10, seed=0)
    assert torch.bincount(labels[held], minlength=3).tolist() == [9, 1, 0]
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(101))


# --------------------------------------------------------------------------- end to end


def folder_config(root: Path, out: Path, **changes) -> C.Config:
    """A run of seconds on the generated folder: from scratch, 32 px, on the CPU."""
    settings = {
        "data.source": f"folder:{root}",
        "data.store_size": STORE,
        "model.weights": "none",
        "model.image_size": 32,
        "train.epochs": 1,
        "train.batch_size": 16,
        "train.device": "cpu",
        "train.out": str(out),
        "train.progress": False,
        "train.eval_batch_size": 50,
    }
    return C.override(C.Config(), {**settings, **changes})


@pytest.fixture(scope="module")
def folder_run(image_folder, tmp_path_factory):
    return train.run(folder_config(image_folder, tmp_path_factory.mktemp("folder_run") / "run"))


def test_a_folder_trains_end_to_end_and_its_checkpoint_knows_the_folder(
    folder_run, image_folder, synthetic_root
):
    model, meta = evaluate.checkpoint.load_model(folder_run.best, "cpu")
    assert meta["classes"] == list(CLASSES) and meta["num_classes"] == 3
    assert meta["input_size"] == STORE and meta["image_size"] == 32
    assert meta["data"]["source"] == f"folder:{image_folder.resolve()}"
    assert folder_run.test is not None and folder_run.test.classes == list(CLASSES)
    assert len(folder_run.test.metrics["per_class_accuracy"]) == 3
    splits = json.loads((folder_run.out_dir / "splits.json").read_text())
    assert splits["classes"] == list(CLASSES) and splits["left_out"] == EXPECTED_REPORT
    assert len(splits["train"]) + len(splits["val"]) + len(splits["test"]) == 3 * PER_CLASS
    assert not set(splits["test"]) & set(splits["train"] + splits["val"])
    # evaluate finds the same test set from the checkpoint's metadata alone.
    report = evaluate.run(folder_run.best, out_dir=folder_run.out_dir / "eval2", plot=False)
    assert report.metrics["count"] == len(splits["test"])
    with pytest.raises(UserError, match="classes"):
        evaluate.run(
            folder_run.best, data_source="cifar10", data_dir=str(synthetic_root), plot=False
        )


def test_predict_export_and_serve_use_the_folder_classes_and_size(folder_run, image_folder):
    image = image_folder / "bird" / "img01.jpg"
    predictor = inference.load(folder_run.best)
    assert predictor.input_size == STORE and predictor.classes == list(CLASSES)
    (pred,) = list(predict.predict_files(predictor, [image], top_k=3))
    assert {name for name, _ in pred.top} == set(CLASSES)

    onnx_report = export.run(folder_run.best, "onnx", parity_images=8)
    assert onnx_report.passed and "folder" in onnx_report.parity.source
    import onnx

    graph = onnx.load(str(onnx_report.path)).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, STORE, STORE]
    exported = inference.load(onnx_report.path, backend="onnx")
    assert exported.classes == list(CLASSES) and exported.input_size == STORE

    ts = export.run(folder_run.best, "torchscript", parity_images=8)
    assert ts.passed

    app = serve.create_app(lambda: inference.load(folder_run.best), ServeConfig())
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/labels").json() == {"labels": list(CLASSES)}
        assert client.get("/readyz").json()["input_size"] == STORE
        r = client.post("/predict", files={"file": ("b.jpg", image.read_bytes(), "image/jpeg")})
        assert r.status_code == 200
        assert {t["label"] for t in r.json()["predictions"][0]["top"]} == set(CLASSES)
        assert "/labels" in client.get("/").text


def test_linear_probe_and_its_feature_cache_work_on_a_folder(image_folder, tmp_path):
    """The same code path as CIFAR-10: cached features keyed by the folder's pixels."""
    cfg = folder_config(image_folder, tmp_path / "probe", **{"train.strategy": "linear"})
    result = train.run(cfg)
    assert result.test is not None and result.test.classes == list(CLASSES)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "cifar10_resnet50", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_describes_a_folder_and_refuses_a_missing_one_in_one_line(image_folder, tmp_path):
    proc = _cli("data", "info", "--data", f"folder:{image_folder}", "--store-size", str(STORE))
    assert proc.returncode == 0, proc.stderr
    assert "classes     3: airplane, automobile, bird" in proc.stdout
    left = [line[len("left out    ") :] for line in proc.stdout.splitlines() if "left out" in line]
    assert left == EXPECTED_REPORT
    proc = _cli("train", "--data", f"folder:{tmp_path / 'nope'}", "--weights", "none")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no such folder" in errors[0]
    proc = _cli("train", "--store-size", "40", "--weights", "none")
    assert proc.returncode == 2 and "are for your own images (folder:PATH, csv:FILE)" in proc.stderr


def test_torchrun_trains_on_a_folder_through_the_same_path(image_folder, tmp_path):
    """Two CPU processes (gloo): rank 0 decodes and caches the folder, the other reads the
    cache; the checkpoint names the folder's classes."""
    import subprocess
    import sys

    out = tmp_path / "run"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "CIFAR10_DIST_TIMEOUT": "60"}
    env["CIFAR10_RESNET50_CACHE"] = str(tmp_path / "cache")  # a cold cache: rank 0 decodes
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--standalone",
        "-m", "cifar10_resnet50", "train", "--data", f"folder:{image_folder}",
        "--store-size", str(STORE), "--weights", "none", "--image-size", "32",
        "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-progress",
        "--no-tensorboard", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 8 × 2 process(es) = 16" in done.stderr
    model_meta = evaluate.checkpoint.load(out / "best.pt")["model_meta"]
    assert model_meta["classes"] == list(CLASSES) and model_meta["input_size"] == STORE
    assert json.loads((out / "splits.json").read_text())["left_out"] == EXPECTED_REPORT


def test_gradual_and_progressive_run_on_a_folder(image_folder, tmp_path):
    """The other strategies and progressive resizing take the folder's arrays as CIFAR-10's."""
    cfg = folder_config(
        image_folder,
        tmp_path / "gradual",
        **{"train.strategy": "gradual", "train.epochs": 2, "train.progressive": True},
    )
    result = train.run(cfg, final_eval=False)
    assert result.epochs_done == 2
    meta = evaluate.checkpoint.load(result.last)["model_meta"]
    assert meta["classes"] == list(CLASSES) and meta["input_size"] == STORE
