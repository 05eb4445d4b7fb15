"""Labels from a CSV list (``--data csv:FILE``, issue 21): the Kaggle layout, read into the
folder source's machinery: the same pixels, classes, splits, cache and report of every row
left out and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar10_resnet50 import config as C
from cifar10_resnet50 import data
from cifar10_resnet50.data import folder, table
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.training import train
from test_folder import STORE, write_image_folder
from test_train import tiny


@pytest.fixture(scope="module")
def listed(tmp_path_factory, synthetic_root) -> Path:
    """photos/<class>/… (the folder tests' images) listed in labels.csv beside photos/, with
    rows that cannot be used."""
    base = tmp_path_factory.mktemp("kaggle")
    photos = write_image_folder(base / "photos", synthetic_root)
    arrays, _ = folder.load(photos, store_size=STORE, workers=1, progress=False)
    rows = ["Image,Label"]  # header names in any case
    for name in sorted(arrays.train_files + arrays.test_files):
        rows.append(f"photos/{name},{name.split('/')[0]}")
    rows += [
        "photos/airplane/img00.png,airplane",  # again
        "photos/missing.png,bird",
        "photos/bird/img01.jpg,",
        "photos/bird/img02.png",
        "photos/automobile/broken.jpg,automobile",
        "",
    ]
    (base / "labels.csv").write_text("\n".join(rows) + "\n")
    return base / "labels.csv"


def test_a_list_loads_the_pixels_labels_and_split_a_folder_of_them_gives(listed):
    arrays, report = table.load(listed, store_size=STORE, progress=False)
    same, _ = folder.load(listed.parent / "photos", store_size=STORE, workers=1, progress=False)
    assert arrays.classes == same.classes == ("airplane", "automobile", "bird")
    assert arrays.source == f"csv:{listed.resolve()}"
    ours = dict(zip(arrays.train_files + arrays.test_files,
                    torch.cat([arrays.train_y, arrays.test_y]).tolist(), strict=True))  # fmt: skip
    theirs = dict(zip(["photos/" + f for f in same.train_files + same.test_files],
                      torch.cat([same.train_y, same.test_y]).tolist(), strict=True))  # fmt: skip
    assert ours == theirs
    first = arrays.train_files[0]
    row = same.train_files.index(first.removeprefix("photos/"))
    assert torch.equal(arrays.train_x[0], same.train_x[row])
    assert len(arrays.test_y) == len(ours) // 10  # a stratified tenth held out, as a folder's
    n = len(ours) + 2  # the header is line 1
    assert report.lines() == [
        "line 76: no label",
        "line 77: 1 column(s); the header has more",
        "photos/airplane/img00.png (line 74): listed again (first on line 2)",
        "photos/automobile/broken.jpg: damaged or truncated JPEG data (OSError: image file is "
        "truncated (110 bytes not processed))",
        "photos/missing.png (line 75): no such file",
    ], n


def test_a_split_column_and_header_problems(tmp_path, listed):
    photos = listed.parent / "photos"
    names = sorted(p.relative_to(photos).as_posix() for p in photos.glob("*/img*"))
    rows = ["path,class,split"]
    for i, name in enumerate(names):
        rows.append(f"{photos / name},{name.split('/')[0]},{'test' if i % 5 == 0 else 'train'}")
    (tmp_path / "split.csv").write_text("\n".join(rows))
    arrays, report = table.load(tmp_path / "split.csv", store_size=STORE, progress=False)
    assert len(arrays.test_y) == len(rows[1::5]) and not report.held_out_test  # absolute paths
    (tmp_path / "bad.csv").write_text("file,colour\na.png,red\n")
    with pytest.raises(UserError, match="no label column in the header") as e:
        table.load(tmp_path / "bad.csv", store_size=STORE, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        data.check(f"csv:{tmp_path / 'none.csv'}", None)
    with pytest.raises(UserError, match="csv:FILE"):
        C.override(C.Config(), {"data.source": "table.csv"})


def test_a_list_trains_and_its_checkpoint_finds_the_same_test_set(listed, tmp_path):
    cfg = tiny(None, tmp_path / "run", **{
        "data.source": f"csv:{listed}", "data.val_size": 6, "data.subset": None,
        "model.image_size": STORE, "train.epochs": 1, "train.batch_size": 8,
        "train.test_images": None,
    })  # fmt: skip
    result = train.run(cfg)
    from cifar10_resnet50 import checkpoint

    _, meta = checkpoint.load_model(result.best)
    again = data.for_model(meta, progress=False)
    assert meta["data"]["source"] == f"csv:{listed.resolve()}"
    assert meta["classes"] == ["airplane", "automobile", "bird"]
    assert result.test is not None and result.test.metrics["count"] == len(again.test_y)


def test_a_dataframe_is_a_list_too_written_once_with_absolute_paths(listed, monkeypatch):
    """``api.train(source=frame)``: a pandas DataFrame with the CSV's columns becomes a ``csv:``
    list in the user cache (named by its content, paths made absolute), so the run, its resume
    and ``evaluate`` read the same images as from the CSV file itself."""
    pd = pytest.importorskip("pandas")
    from cifar10_resnet50 import api

    monkeypatch.chdir(listed.parent)  # relative paths start at the current directory
    frame = pd.read_csv(listed, keep_default_na=False)
    cfg = api._config(None, {"source": frame, "epochs": 1})
    file = Path(table.parse(cfg.data.source))
    assert file.parent.name == "tables" and file.is_file()
    assert api._config(None, {"data.source": frame.copy()}).data.source == cfg.data.source
    assert all(Path(row.split(",")[0]).is_absolute() for row in file.read_text().splitlines()[1:])
    from_frame, _ = table.load(file, store_size=STORE, progress=False)
    from_csv, _ = table.load(listed, store_size=STORE, progress=False)
    assert from_frame.classes == from_csv.classes
    assert [Path(f).name for f in from_frame.train_files] == [
        Path(f).name for f in from_csv.train_files
    ]
    assert torch.equal(from_frame.train_x, from_csv.train_x)
    assert torch.equal(from_frame.test_y, from_csv.test_y)
    with pytest.raises(UserError, match="no label column in the header"):
        api._config(None, {"source": frame.rename(columns={"Label": "kind"})})
