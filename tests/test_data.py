import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifar10_resnet50 import data
from cifar10_resnet50.config import AugmentConfig
from cifar10_resnet50.data import augment, cifar10
from cifar10_resnet50.errors import UserError

# ---------------------------------------------------------------- verify / load


def test_verify_reports_structure_for_a_non_official_copy(synthetic_root):
    report = cifar10.verify(synthetic_root)
    assert report.kind == "structure"
    assert set(report.mismatched) == set(cifar10.FILE_MD5)
    assert "not the official bytes" in report.describe()


def test_verify_reports_official_when_md5s_match(synthetic_root, monkeypatch):
    folder = synthetic_root / cifar10.BATCH_DIR
    md5s = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in cifar10.FILE_MD5}
    monkeypatch.setattr(cifar10, "FILE_MD5", md5s)
    report = cifar10.verify(synthetic_root)
    assert report.kind == "official" and report.mismatched == ()


def test_load_gives_uint8_tensors_in_official_pixel_order(synthetic_root):
    arrays = cifar10.load(synthetic_root)
    assert arrays.train_x.shape == (50000, 3, 32, 32) and arrays.train_x.dtype == torch.uint8
    assert arrays.test_x.shape == (10000, 3, 32, 32)
    assert arrays.train_y.dtype == torch.int64
    assert torch.bincount(arrays.test_y).tolist() == [1000] * 10
    with open(synthetic_root / cifar10.BATCH_DIR / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    # Row 0: 1024 red values, then green, then blue → channel planes of image 0.
    assert torch.equal(arrays.train_x[0, 1].flatten(), torch.from_numpy(raw["data"][0, 1024:2048]))
    assert arrays.train_y[:10].tolist() == raw["labels"][:10]


def test_data_dir_may_name_the_batches_folder_itself(synthetic_root):
    assert cifar10.resolve_data_dir(synthetic_root / cifar10.BATCH_DIR) == synthetic_root


def test_load_uses_the_cache_and_rebuilds_it_when_a_file_changes(synthetic_copy, monkeypatch):
    first = cifar10.load(synthetic_copy)
    calls = []
    real_read = cifar10.read_folder
    monkeypatch.setattr(cifar10, "read_folder", lambda root: calls.append(root) or real_read(root))
    again = cifar10.load(synthetic_copy)
    assert calls == [] and torch.equal(again.train_x, first.train_x)
    batch = synthetic_copy / cifar10.BATCH_DIR / "test_batch"
    os.utime(batch, ns=(1, 1))  # a changed mtime means a changed file
    cifar10.load(synthetic_copy)
    assert len(calls) == 1


def test_the_cache_keeps_only_the_most_recently_used_folders(synthetic_root, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in range(cifar10.CACHE_KEEP + 2):  # stale entries from folders loaded earlier
        stale = cache / f"cifar10-stale{i}.pt"
        stale.write_bytes(b"x")
        os.utime(stale, (1000 + i, 1000 + i))
    cifar10.load(synthetic_root, cache_dir=cache)
    kept = sorted(p.name for p in cache.glob("cifar10-*.pt"))
    assert len(kept) == cifar10.CACHE_KEEP
    newest_stale = [
        f"cifar10-stale{cifar10.CACHE_KEEP + 1}.pt",
        f"cifar10-stale{cifar10.CACHE_KEEP}.pt",
    ]
    assert set(newest_stale) < set(kept)  # the oldest entries went, the new one stays


def _rewrite_batch(path: Path, **changes):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch.update(changes)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "data_batch_3").unlink(), "data_batch_3 is missing"),
        (
            lambda d: (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:5000]),
            "test_batch is unreadable",
        ),
        (lambda d: (d / "data_batch_2").write_bytes(b"not a pickle"), "data_batch_2 is unreadable"),
        (
            lambda d: _rewrite_batch(
                d / "data_batch_1", data=torch.zeros(10, 3072, dtype=torch.uint8).numpy()
            ),
            "10000×3072",
        ),
        (
            lambda d: _rewrite_batch(d / "data_batch_4", labels=[11] * 10000),
            "label 0 is 11, outside 0–9",
        ),
        (lambda d: _rewrite_batch(d / "test_batch", labels=[0] * 10000), "1000 images per class"),
        (
            lambda d: (d / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"] * 10})),
            "class names",
        ),
    ],
)
def test_broken_folders_get_one_line_errors_naming_the_file(synthetic_copy, damage, message):
    damage(synthetic_copy / cifar10.BATCH_DIR)
    with pytest.raises(UserError, match=message) as info:
        cifar10.verify(synthetic_copy)
    assert "\n" not in str(info.value)


def test_missing_folder_error_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="data download"):
        cifar10.load(tmp_path)


# ---------------------------------------------------------------- download and extraction


def _archive(synthetic_root: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(synthetic_root / cifar10.BATCH_DIR, arcname=cifar10.BATCH_DIR)
    return path


@pytest.fixture(scope="module")
def archive(synthetic_root, tmp_path_factory):
    path = _archive(synthetic_root, tmp_path_factory.mktemp("arch") / cifar10.ARCHIVE_NAME)
    return path, hashlib.md5(path.read_bytes()).hexdigest()


class FakeResponse(io.BytesIO):
    """What urlopen returns, served from bytes; can break after ``fail_after`` bytes."""

    def __init__(self, payload: bytes, fail_after: int | None = None, length: int | None = None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(length if length is not None else len(payload))}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(n)


def _no_sleep(monkeypatch):
    monkeypatch.setattr(cifar10.time, "sleep", lambda s: None)


def test_download_from_a_file_url_verifies_and_extracts(archive, tmp_path, monkeypatch):
    path, md5 = archive
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5)
    root = cifar10.download(tmp_path / "d", url=path.as_uri(), progress=False)
    assert cifar10.verify(root).kind == "structure"
    assert sorted(p.name for p in root.iterdir()) == [
        cifar10.BATCH_DIR
    ]  # archive removed, no temp files


def test_md5_mismatch_fails_after_retries_and_leaves_nothing(archive, tmp_path, monkeypatch):
    path, _ = archive
    _no_sleep(monkeypatch)
    calls = []

    def opener(url, timeout):
        calls.append(url)
        return FakeResponse(path.read_bytes())

    with pytest.raises(UserError, match="md5 mismatch") as info:
        cifar10.download_file(
            "https://x/c.tgz", tmp_path / "c.tgz", "0" * 32, opener=opener, progress=False
        )
    assert len(calls) == 3
    assert "--data-dir" in str(info.value)  # names the offline way out
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_is_retried_then_succeeds(archive, tmp_path, monkeypatch):
    path, md5 = archive
    _no_sleep(monkeypatch)
    payload = path.read_bytes()
    responses = [FakeResponse(payload, fail_after=1 << 20), FakeResponse(payload)]
    out = cifar10.download_file(
        "https://x/c.tgz",
        tmp_path / "c.tgz",
        md5,
        opener=lambda u, t: responses.pop(0),
        progress=False,
    )
    assert out.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["c.tgz"]


def test_truncated_download_is_rejected(archive, tmp_path, monkeypatch):
    path, md5 = archive
    _no_sleep(monkeypatch)
    payload = path.read_bytes()
    # The server closes early: fewer bytes than Content-Length announced.
    opener = lambda u, t: FakeResponse(payload[:1000], length=len(payload))  # noqa: E731
    with pytest.raises(UserError, match="incomplete"):
        cifar10.download_file(
            "https://x/c.tgz", tmp_path / "c.tgz", md5, opener=opener, progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_network_errors_end_in_an_offline_hint(tmp_path, monkeypatch):
    _no_sleep(monkeypatch)

    def opener(url, timeout):
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(UserError, match="Offline"):
        cifar10.download(tmp_path, opener=opener, progress=False)
    assert list(tmp_path.iterdir()) == []


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, payload: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


@pytest.mark.parametrize(
    "evil, message",
    [
        (_file("cifar-10-batches-py/../../evil.txt"), "unsafe member path"),
        (_file("/tmp/evil.txt"), "unsafe member path"),
        (_file("cifar-10-batches-py/extra.py"), "unexpected member"),
    ],
)
def test_unsafe_archive_members_are_refused_before_writing(tmp_path, evil, message):
    good = [_file(f"{cifar10.BATCH_DIR}/{n}") for n in cifar10.FILE_MD5]
    archive = _tar_with(tmp_path / "a.tgz", [*good, evil])
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match=message):
        cifar10.safe_extract(archive, dest)
    assert not dest.exists()
    assert not (tmp_path.parent / "evil.txt").exists()


def test_symlink_and_device_members_are_refused(tmp_path):
    link = tarfile.TarInfo(f"{cifar10.BATCH_DIR}/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    dev = tarfile.TarInfo(f"{cifar10.BATCH_DIR}/test_batch")
    dev.type = tarfile.CHRTYPE
    for bad in (link, dev):
        archive = _tar_with(tmp_path / "a.tgz", [(bad, None)])
        with pytest.raises(UserError, match="not a regular file"):
            cifar10.safe_extract(archive, tmp_path / "dest")
        assert not (tmp_path / "dest").exists()


def test_archive_missing_files_is_refused(tmp_path):
    archive = _tar_with(tmp_path / "a.tgz", [_file(f"{cifar10.BATCH_DIR}/data_batch_1")])
    with pytest.raises(UserError, match="lacks"):
        cifar10.safe_extract(archive, tmp_path / "dest")


# ---------------------------------------------------------------- split and batches


def test_stratified_split_is_balanced_disjoint_and_seeded():
    labels = torch.arange(10).repeat(500)
    tr, va = data.stratified_split(labels, 1000, seed=3)
    assert len(va) == 1000 and len(tr) == 4000
    assert torch.bincount(labels[va]).tolist() == [100] * 10
    assert set(tr.tolist()).isdisjoint(va.tolist())
    tr2, va2 = data.stratified_split(labels, 1000, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, data.stratified_split(labels, 1000, seed=4)[1])
    assert len(data.stratified_split(labels, 0, seed=0)[1]) == 0


def test_random_crop_matches_reflect_padding_then_crop():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = augment.random_crop_flip(x, torch.Generator().manual_seed(5), padding=4, flip=False)
    # Replay the same draws and build the reference with F.pad(reflect) + slicing.
    gen = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (8,), generator=gen)
    dx = torch.randint(0, 9, (8,), generator=gen)
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for i in range(8):
        ref = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], ref)


def test_flip_only_mirrors_some_images():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment.random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54


def test_train_batches_resume_midway_reproduces_the_rest():
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(100)
    full = list(augment.train_batches(x, y, batch_size=16, seed=1, epoch=2))
    tail = list(augment.train_batches(x, y, batch_size=16, seed=1, epoch=2, start=3))
    assert len(full) == 6  # 100 // 16, last partial batch dropped
    for (i, xa, ya, _), (j, xb, yb, _) in zip(full[3:], tail, strict=True):
        assert i == j and torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = list(augment.train_batches(x, y, batch_size=16, seed=1, epoch=3))
    assert not torch.equal(full[0][2], other_epoch[0][2])


def test_training_rows_picked_per_batch_equal_a_copied_split():
    """Training indexes its split's rows per batch (no copy of the split in memory); the
    batches, crops and mixes are those of the copied split, bit for bit."""
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(100) % 10
    rows = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:70]
    kw = dict(batch_size=16, seed=1, epoch=2, recipe=AugmentConfig(mixup=0.4), num_classes=10)
    copied = list(augment.train_batches(x[rows], y[rows], **kw))
    picked = list(augment.train_batches(x, y, rows=rows, **kw))
    assert len(picked) == len(copied) == 4
    for a, b in zip(copied, picked, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a[1:], b[1:], strict=True))


def test_ranks_take_disjoint_shards_of_one_order():
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(64)
    r0 = [
        yb
        for _, _, yb, _ in augment.train_batches(
            x, y, batch_size=8, seed=0, epoch=0, rank=0, world_size=2
        )
    ]
    r1 = [
        yb
        for _, _, yb, _ in augment.train_batches(
            x, y, batch_size=8, seed=0, epoch=0, rank=1, world_size=2
        )
    ]
    seen = torch.cat(r0 + r1).tolist()
    assert len(r0) == len(r1) == 4 and sorted(seen) == list(range(64))


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_mixing_gives_soft_targets_that_sum_to_one(mixup, cutmix):
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(16) % 10
    xm, t = augment.mix_batch(
        x, y, 10, seed=7, gen=torch.Generator().manual_seed(7), mixup=mixup, cutmix=cutmix
    )
    assert xm.dtype == torch.uint8 and xm.shape == x.shape
    assert torch.allclose(t.sum(1), torch.ones(16))
    assert (t.max(1).values >= 0.5 - 1e-6).all()
