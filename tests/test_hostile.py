"""Our own adversarial suite: what a hostile user (or bad luck) does to files, data folders,
model files, images, names and disks, and what must happen instead of damage or a traceback.

Classes, as in the hostile trial that found them: outputs destroying files, code run from
data, one bad image aborting a batch, costs paid before limits, broken model files, full
disks, silent cache damage, terminal and encoding, killed writers, torn logs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar10_resnet50 import checkpoint, cli, fileio, images
from cifar10_resnet50 import model as M
from cifar10_resnet50.data import cifar10
from cifar10_resnet50.data.cifar10 import CLASSES as CIFAR10_CLASSES
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.serving import export, files, inference
from corpus import huge_header_png

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- 1. outputs never destroy


def test_export_onto_its_own_checkpoint_is_refused_through_links(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    before = ckpt.read_bytes()
    (tmp_path / "link.onnx").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.onnx")
    for out in (ckpt, tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        with pytest.raises(UserError, match="same file as the input"):
            export.run(ckpt, "onnx", out=out)
    assert ckpt.read_bytes() == before and (tmp_path / "link.onnx").is_symlink()


def test_predict_output_onto_an_input_image_is_refused(capsys, tiny_checkpoint, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    before = img.read_bytes()
    code, _, err = _cli(capsys, "predict", tiny_checkpoint, img, "--output", img)
    assert code == 2 and "same file as the input" in err and err.count("\n") == 1
    assert img.read_bytes() == before


def test_symlink_output_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    fileio.write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_fifo_and_character_devices_are_written_in_place_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there first
    os.set_blocking(reader, True)
    fileio.write_bytes(fifo, b"through the pipe")
    with os.fdopen(reader, "rb") as f:
        assert f.read() == b"through the pipe" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    fileio.write_bytes("/dev/null", b"x" * 100)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_fifo_nobody_reads_is_a_one_line_error_not_a_hang(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(fileio.WriteError, match="FIFO that no process is reading"):
        fileio.write_bytes(fifo, b"nobody listens")  # before: blocked in open() forever
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dash_means_stdout(capfd):
    fileio.write_bytes("-", b"to stdout\n")
    assert capfd.readouterr().out == "to stdout\n"


# ---------------------------------------------------------------- 2. data runs no code


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta"])
def test_a_pickle_payload_in_the_data_folder_never_runs(synthetic_copy, tmp_path, victim):
    marker = tmp_path / "pwned"
    folder = synthetic_copy / cifar10.BATCH_DIR
    (folder / victim).write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    for action in (cifar10.verify, cifar10.load):
        with pytest.raises(UserError, match="not a CIFAR-10 batch.*posix.system|nothing was run"):
            action(synthetic_copy)
    assert not marker.exists()


def _rewrite(path: Path, **changes) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch.update(changes)
    path.write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labels": [3.5] + [0] * 9999}, "label 0 is 3.5 \\(float\\)"),
        ({"labels": ["3"] + [0] * 9999}, "label 0 is '3' \\(str\\)"),
        ({"labels": [0] * 9999 + [10]}, "label 9999 is 10, outside 0–9"),
        ({"labels": [0] * 9999}, "9999 labels for 10000 images"),
        ({"labels": "0123"}, "'labels' is a str"),
        ({"data": np.zeros((10000, 3072), np.float32)}, "found float32 \\(10000, 3072\\)"),
        ({"data": np.zeros((10000, 32, 32, 3), np.uint8)}, "found uint8 \\(10000, 32, 32, 3\\)"),
        ({"data": [1, 2, 3]}, "found list"),
    ],
)
def test_bad_labels_and_data_name_the_exact_file_and_problem(synthetic_copy, changes, message):
    path = synthetic_copy / cifar10.BATCH_DIR / "data_batch_3"
    _rewrite(path, **changes)
    with pytest.raises(UserError, match=message) as info:
        cifar10.verify(synthetic_copy)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- 3. model files validated


def _ckpt_with(tmp_path: Path, tiny_checkpoint: Path, name: str, mutate) -> Path:
    blob = torch.load(tiny_checkpoint, weights_only=True)
    mutate(blob)
    path = tmp_path / name
    torch.save(blob, path)
    return path


BAD_CHECKPOINTS = {
    "no_meta": (lambda b: b.pop("model_meta"), "model metadata is missing"),
    "size_text": (lambda b: b["model_meta"].update(image_size="abc"), "'image_size' is 'abc'"),
    "size_zero": (lambda b: b["model_meta"].update(image_size=0), "'image_size' is 0"),
    "three_names": (
        lambda b: b["model_meta"].update(classes=["a", "b", "c"]),
        "names 3 classes for a 10-way model",
    ),
    "classes_text": (lambda b: b["model_meta"].update(classes="abc"), "'classes' is not a list"),
    "head_mismatch": (
        lambda b: b["model_meta"].update(num_classes=3, classes=["a", "b", "c"]),
        "weights do not fit",
    ),
    "nan_weights": (lambda b: b["model"]["net.fc.weight"].fill_(float("nan")), "NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_broken_checkpoints_are_one_line_errors_everywhere(capsys, tiny_checkpoint, tmp_path, case):
    mutate, message = BAD_CHECKPOINTS[case]
    path = _ckpt_with(tmp_path, tiny_checkpoint, f"{case}.pt", mutate)
    with pytest.raises(UserError, match=message):
        inference.load(path)
    img = tmp_path / "a.png"
    img.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    for args in (("predict", path, img, "--format", "json"), ("export", path, "--format", "onnx")):
        code, out, err = _cli(capsys, *args)
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1, (args, err)
        assert "unexpected" not in err and out == ""


def test_serve_reports_a_broken_model_on_readyz_never_500(tiny_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from cifar10_resnet50.serving import serve

    path = _ckpt_with(tmp_path, tiny_checkpoint, "bad.pt", BAD_CHECKPOINTS["three_names"][0])
    with TestClient(serve.create_app(lambda: inference.load(path))) as c:
        deadline = time.time() + 30
        while "failed" not in c.get("/readyz").text and time.time() < deadline:
            time.sleep(0.05)
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "3 classes for a 10-way" in ready.text
        r = c.post("/predict", content=_png(np.zeros((32, 32, 3), np.uint8)))
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_onnx_with_wrong_metadata_or_nan_output_is_refused(tiny_checkpoint, tmp_path):
    model, meta = checkpoint.load_model(tiny_checkpoint)
    wrapper = export.WithSoftmax(model)
    bad_meta = tmp_path / "bad_meta.onnx"
    export._write_onnx(wrapper, {**meta, "classes": ["only", "two"]}, bad_meta)
    with pytest.raises(UserError, match="names 2 classes for a 10-way"):
        inference.load(bad_meta)
    with torch.no_grad():
        model.net.fc.bias.fill_(float("nan"))
    nan = tmp_path / "nan.onnx"
    export._write_onnx(wrapper, meta, nan)
    with pytest.raises(UserError, match="NaN or inf"):
        inference.load(nan)


def test_torchscript_loads_only_with_the_explicit_code_flag(capsys, tiny_checkpoint, tmp_path):
    ts = tmp_path / "m.torchscript.pt"
    model, meta = checkpoint.load_model(tiny_checkpoint)
    export._write_torchscript(export.WithSoftmax(model), meta, ts)
    img = tmp_path / "a.png"
    img.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    code, _, err = _cli(capsys, "predict", ts, img)
    assert code == 2 and "--allow-torchscript-code" in err and "code" in err
    code, out, _ = _cli(capsys, "predict", ts, img, "--allow-torchscript-code")
    assert code == 0 and "a.png" in out


# ---------------------------------------------------------------- 4. any decode failure


def test_any_exception_inside_pillow_is_that_images_error(monkeypatch, tiny_checkpoint, tmp_path):
    import struct

    from PIL import ImageFile

    good = _png(np.zeros((32, 32, 3), np.uint8))
    for exc in (struct.error("bad exif"), RuntimeError("avif"), KeyError("plugin")):

        def boom(self, exc=exc):
            raise exc

        monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
        with pytest.raises(images.ImageError) as info:
            images.decode(good, "x.png", size=32)
        assert info.value.kind == "undecodable" and type(exc).__name__ in str(info.value)


def _seed_files() -> dict[str, bytes]:
    """One small image in every format Pillow writes here (and so reads)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    seeds = {}
    for fmt, im, kw in [
        ("PNG", rgb, {}),
        ("JPEG", rgb, {"progressive": True}),
        ("GIF", rgb, {}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {"compression": "tiff_lzw"}),
        ("WEBP", rgb, {}),
        ("ICO", rgb, {}),
        ("PPM", rgb, {}),
        ("TGA", rgb, {}),
        ("PCX", rgb, {}),
        ("SGI", rgb, {}),
        ("QOI", rgb, {}),
        ("DDS", rgb.convert("RGBA"), {}),
        ("IM", rgb, {}),
        ("SPIDER", rgb.convert("F"), {}),
        ("JPEG2000", rgb, {}),
        ("AVIF", rgb, {}),
        ("BLP", rgb.convert("P"), {}),
        ("MSP", rgb.convert("1"), {}),
        ("XBM", rgb.convert("1"), {}),
        ("ICNS", rgb.resize((32, 32)), {}),
        ("MPO", rgb, {}),
    ]:
        buf = io.BytesIO()
        try:
            im.save(buf, fmt, **kw)
        except (KeyError, OSError, ValueError):  # a codec this build lacks
            continue
        seeds[fmt] = buf.getvalue()
    return seeds


def test_fuzzed_files_of_every_format_are_decoded_or_rejected_never_crash():
    """Fixed-seed mutations (bit flips, truncation, spliced garbage) of every seed format:
    each must come back decoded or as an ImageError; anything else is a bug."""
    seeds = _seed_files()
    assert len(seeds) >= 15, sorted(seeds)
    rng = np.random.default_rng(1234)
    outcomes = {"decoded": 0, "rejected": 0}
    for fmt, seed in sorted(seeds.items()):
        for i in range(40):
            mutant = bytearray(seed)
            kind = i % 4
            if kind == 0:  # flip bytes
                for pos in rng.integers(0, len(mutant), 1 + i % 8):
                    mutant[pos] ^= int(rng.integers(1, 256))
            elif kind == 1:  # truncate
                mutant = mutant[: int(rng.integers(1, len(mutant)))]
            elif kind == 2:  # overwrite a header field region with garbage
                pos = int(rng.integers(0, min(64, len(mutant))))
                mutant[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
            else:  # splice random bytes into the middle
                pos = int(rng.integers(0, len(mutant)))
                mutant[pos:pos] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
            try:
                out = images.decode(bytes(mutant), f"{fmt}-{i}", max_seconds=2.0, size=32)
                assert out.pixels.shape == (32, 32, 3) and out.pixels.dtype == np.uint8
                outcomes["decoded"] += 1
            except images.ImageError:
                outcomes["rejected"] += 1
    assert outcomes["decoded"] > 0 and outcomes["rejected"] > 0, outcomes


# ---------------------------------------------------------------- 5. costs bounded first


def _ico_holding(png: bytes, claimed: int = 32) -> bytes:
    """An ICO whose one entry claims ``claimed`` px but holds ``png``."""
    import struct

    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_container_entries_are_held_to_the_pixel_limit_before_decoding(monkeypatch):
    from PIL import ImageFile

    decoded = []
    original = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(images.ImageError) as info:
        images.decode(_ico_holding(huge_header_png(13000, 13000)), "bomb.ico", size=32)
    assert info.value.kind == "too_many_pixels" and "169,000,000" in str(info.value)
    assert (13000, 13000) not in decoded


def _repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: valid, and costly per scan."""
    last = jpeg.rindex(b"\xff\xda")
    scan = jpeg[last:-2]  # up to the EOI marker
    return jpeg[:-2] + scan * times + b"\xff\xd9"


def test_jpeg_with_thousands_of_scans_is_refused_at_the_header():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(buf, "JPEG", progressive=True)
    ok = _repeat_last_scan(buf.getvalue(), 20)
    assert images.decode(ok, "ok.jpg", size=32).pixels.shape == (32, 32, 3)
    with pytest.raises(images.ImageError, match="2,0.. scans"):
        images.decode(_repeat_last_scan(buf.getvalue(), 2000), "scans.jpg", size=32)


def test_large_jpegs_decode_in_draft_mode_with_their_true_size(monkeypatch):
    from PIL import ImageFile

    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=90)
    loaded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda s: loaded.append(s.size) or original(s))
    out = images.decode(buf.getvalue(), "big.jpg", size=32)
    assert out.original_size == (4000, 3000)
    assert set(loaded) == {(500, 375)}  # libjpeg scaled by 1/8 while decoding: 64× fewer px
    full = Image.fromarray(big).crop((500, 0, 3500, 3000)).resize((32, 32), Image.LANCZOS)
    assert np.abs(out.pixels.astype(int) - np.asarray(full)).mean() < 3


def test_the_decode_deadline_stops_a_decoder_at_its_next_read():
    with pytest.raises(images.ImageError) as info:
        images.decode(_png(np.zeros((64, 64, 3), np.uint8)), "slow.png", max_seconds=0, size=32)
    assert info.value.kind == "too_slow" and "per-image limit" in str(info.value)


# ---------------------------------------------------------------- 6. folders never loop


def test_links_to_ancestors_visit_each_real_file_once(tmp_path):
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (root / name).write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    (root / "loop1").symlink_to(root)
    (root / "sub" / "loop2").symlink_to(root)
    (root / "sub" / "again.png").symlink_to(root / "a.png")
    found, missing = files.expand([str(root), f"{root}/**/*.png", str(root / "a.png")])
    assert missing == [] and sorted(p.name for p in found) == ["a.png", "b.png"]
    globbed = list(files.glob_files(f"{root}/**/*.png"))
    assert len({os.path.realpath(p) for p in globbed}) == 2


def test_glob_semantics_match_the_shell(tmp_path):
    for rel in ("x.png", "d/y.png", "d/e/z.png", ".hidden/h.png", "d/w.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    names = lambda pattern: sorted(p.name for p in files.glob_files(f"{tmp_path}/{pattern}"))  # noqa: E731
    assert names("*.png") == ["x.png"]
    assert names("**/*.png") == ["x.png", "y.png", "z.png"]
    assert names("d/*/*.png") == ["z.png"]
    assert names("d/[wy].*") == ["w.jpg", "y.png"]


# ---------------------------------------------------------------- 7. names are data


def test_hostile_names_are_escaped_for_terminals_and_exact_in_json_and_csv(
    capsys, tiny_checkpoint, tmp_path
):
    folder = tmp_path / "imgs"
    folder.mkdir()
    png = _png(np.zeros((32, 32, 3), np.uint8))
    evil = "\x1b[31mred\nrow.png"
    (folder / evil).write_bytes(png)
    raw = os.fsencode(folder) + b"/\xff\xfe.png"  # not UTF-8
    with open(raw, "wb") as f:
        f.write(png)
    code, out, _ = _cli(capsys, "predict", tiny_checkpoint, folder)
    assert code == 0 and "\x1b" not in out and "\\x1b[31mred\\nrow.png" in out
    assert "\\xff\\xfe.png" in out and len(out.splitlines()) == 3
    table_file = tmp_path / "t.txt"
    assert _cli(capsys, "predict", tiny_checkpoint, folder, "--output", table_file)[0] == 0
    code, out, _ = _cli(capsys, "predict", tiny_checkpoint, folder, "--format", "json")
    paths = {r["path"] for r in json.loads(out)}
    assert str(folder / evil) in paths and os.fsdecode(raw) in paths
    csv_file = tmp_path / "p.csv"
    _cli(capsys, "predict", tiny_checkpoint, folder, "--format", "csv", "--output", csv_file)
    assert raw in csv_file.read_bytes()  # the original bytes, exactly


def test_a_bad_image_name_in_an_error_line_cannot_split_it(capsys, tiny_checkpoint, tmp_path):
    bad = tmp_path / "x\n\x1b]0;owned\x07.png"
    bad.write_bytes(b"not an image")
    code, _, err = _cli(capsys, "predict", tiny_checkpoint, bad)
    lines = err.splitlines()
    assert code == 2 and lines[0].startswith("error:") and "\x1b" not in err
    assert len(lines) == 2  # the error, then the summary


# ---------------------------------------------------------------- 8. full disks


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (root only); skipped with the reason elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full-disk test mounts a small tmpfs, which needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_is_one_line_with_the_space_needed_and_leaves_nothing(
    capsys, tiny_checkpoint, tiny_disk
):
    old = tiny_disk / "best.pt"
    old.write_bytes(b"previous checkpoint")
    blob = torch.load(tiny_checkpoint, weights_only=True)
    with pytest.raises(fileio.WriteError) as info:
        checkpoint.save(old, {k: blob[k] for k in ("model_meta", "model", "config")})
    message = str(info.value)
    assert str(old) in message and "No space left" in message and "MB free" in message
    assert "needs" in message and "\n" not in message
    assert old.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["best.pt"]  # no temporary file
    code, _, err = _cli(
        capsys, "export", tiny_checkpoint, "--format", "onnx", "--out", tiny_disk / "m.onnx"
    )
    assert code == 2 and "No space left" in err and err.count("\n") == 1
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["best.pt"]


def test_writing_to_dev_full_is_one_line():
    with pytest.raises(fileio.WriteError, match="/dev/full: No space left"):
        fileio.write_bytes("/dev/full", b"x" * 10)


# ---------------------------------------------------------------- 9. cache damage


def test_a_damaged_or_forged_tensor_cache_is_rebuilt_never_used(synthetic_copy, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    first = cifar10.load(synthetic_copy, cache_dir)
    (cache,) = cache_dir.glob("cifar10-*.pt")
    blob = torch.load(cache, weights_only=True)
    blob["train_x"][0, 0, 0, 0] ^= 0xFF  # one flipped byte, right fingerprint
    torch.save(blob, cache)
    again = cifar10.load(synthetic_copy, cache_dir)
    assert torch.equal(again.train_x, first.train_x) and "damaged" in caplog.text
    forged = torch.load(cache, weights_only=True)
    forged.update(train_x=first.train_x[:10], train_y=first.train_y[:10])
    torch.save(forged, cache)
    caplog.clear()
    assert (
        len(cifar10.load(synthetic_copy, cache_dir).train_x) == 50000 and "damaged" in caplog.text
    )


# ---------------------------------------------------------------- 10. serve logs, no tracebacks


def test_client_disconnect_mid_upload_is_one_log_line(tiny_checkpoint, caplog):
    import asyncio

    from cifar10_resnet50.serving import serve
    from cifar10_resnet50.serving.settings import ServeConfig

    class Gone:
        headers = {"content-type": "image/png"}
        client = type("C", (), {"host": "10.0.0.9"})()

        async def stream(self):
            from starlette.requests import ClientDisconnect

            yield b"\x89PNG"
            raise ClientDisconnect()

    caplog.set_level("INFO", logger="cifar10_resnet50.serving.serve")
    with pytest.raises(serve.ApiError) as info:
        asyncio.run(serve._read_body(Gone(), ServeConfig()))
    assert info.value.code == "client_disconnected"
    assert "disconnected during the upload" in caplog.text and "Traceback" not in caplog.text


# ---------------------------------------------------------------- 12.1 killed writers


def test_a_writer_killed_mid_save_leaves_a_temp_that_the_next_run_removes(tmp_path, caplog):
    target = tmp_path / "last.pt"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from cifar10_resnet50 import fileio
        with fileio.atomic_open({str(target)!r}) as f:
            f.write(b"half a checkpoint")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and not target.exists()
    with fileio.atomic_open(tmp_path / "other.json") as f:  # a live writer (this process)...
        f.write(b"{}")
        mine = [p for p in tmp_path.iterdir() if p.name.startswith(".other.json.")]
        removed = fileio.remove_stale_temps(tmp_path)
        assert removed == left and all(p.exists() for p in mine)  # ...keeps its file
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert "stale temporary file" in caplog.text


def _tiny_run_config(root: Path, out: Path, epochs: int = 1):
    from cifar10_resnet50 import config as C

    return C.override(
        C.Config(),
        {
            "data.data_dir": str(root),
            "data.subset": 64,
            "data.val_size": 0,
            "model.weights": "none",
            "model.image_size": 32,
            "train.epochs": epochs,
            "train.batch_size": 32,
            "train.device": "cpu",
            "train.progress": False,
            "train.out": str(out),
        },
    )


def test_training_start_removes_stale_temps_in_the_run_folder(synthetic_root, tmp_path):
    from cifar10_resnet50.training import train

    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".last.pt.{fileio._HOST}-{2**22 + 12345}.abcd1234.tmp"  # no such PID
    stale.write_bytes(b"x" * 1000)
    train.run(_tiny_run_config(synthetic_root, out), final_eval=False, stop_after_steps=1)
    assert not stale.exists() and (out / "last.pt").is_file()


def test_resume_drops_a_torn_last_metrics_line(synthetic_root, tmp_path, caplog):
    from cifar10_resnet50.training import train

    out = tmp_path / "run"
    cfg = _tiny_run_config(synthetic_root, out, epochs=2)
    train.run(cfg, final_eval=False, stop_after_steps=3)  # 2 steps per epoch: inside epoch 2
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 4, "train_lo')  # a kill mid-append
    result = train.run(cfg, resume=True, final_eval=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.epochs_done == 2 and [r["epoch"] for r in rows] == [1, 2]
    assert "torn last line" in caplog.text


# ---------------------------------------------------------------- 12.4 multi-frame formats


def _psd(composite: np.ndarray, layer: np.ndarray) -> bytes:
    """A minimal 8-bit RGB PSD with one layer (Pillow numbers PSD frames from 1)."""
    import struct

    h, w, _ = composite.shape
    out = io.BytesIO()
    out.write(b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3))
    out.write(struct.pack(">II", 0, 0))  # colour mode data, image resources
    name = b"\x05layer" + b"\x00" * 2
    extra = struct.pack(">II", 0, 0) + name
    rec = struct.pack(">iiiiH", 0, 0, h, w, 3)
    rec += b"".join(struct.pack(">hI", c, 2 + h * w) for c in range(3))
    rec += b"8BIMnorm" + bytes([255, 0, 0, 0]) + struct.pack(">I", len(extra)) + extra
    chans = b"".join(struct.pack(">H", 0) + layer[:, :, c].tobytes() for c in range(3))
    info = struct.pack(">h", 1) + rec + chans
    info += b"\x00" * (len(info) % 2)
    block = struct.pack(">I", len(info)) + info + struct.pack(">I", 0)
    out.write(struct.pack(">I", len(block)) + block)
    out.write(struct.pack(">H", 0) + b"".join(composite[:, :, c].tobytes() for c in range(3)))
    return out.getvalue()


def _multi_frame(fmt: str) -> bytes:
    red, blue = Image.new("RGB", (32, 32), (220, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 220))
    if fmt == "PSD":
        return _psd(np.asarray(red), np.asarray(blue))
    buf = io.BytesIO()
    if fmt == "ICO":  # sizes, not frames: the smallest entry ≥ 32 px is the one used
        Image.new("RGB", (64, 64), (220, 0, 0)).save(
            buf, "ICO", sizes=[(16, 16), (32, 32), (64, 64)]
        )
    elif fmt == "ICNS":
        Image.new("RGB", (64, 64), (220, 0, 0)).save(buf, "ICNS")
    else:
        save_fmt = "PNG" if fmt == "APNG" else fmt
        red.save(buf, save_fmt, save_all=True, append_images=[blue])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "MPO", "ICO", "ICNS", "PSD", "WEBP", "APNG"])
def test_multi_frame_formats_use_their_first_real_frame(fmt):
    px = images.decode(_multi_frame(fmt), f"x.{fmt.lower()}", size=32).pixels.astype(int)
    assert px[..., 0].mean() > 180 and px[..., 2].mean() < 40, (fmt, px.mean(axis=(0, 1)))


# ---------------------------------------------------------------- weights of other shapes


def test_model_meta_roundtrip_is_valid():
    from cifar10_resnet50.meta import validate_meta

    assert validate_meta(M.model_meta("none", 32, CIFAR10_CLASSES, 32), "x")["num_classes"] == 10


# ---------------------------------------------------------------- special files never block


def _cli_process(*args, env=None, timeout=120):
    """The CLI in its own process; the timeout only guards against the hang being tested."""
    return subprocess.run(
        [sys.executable, "-m", "cifar10_resnet50", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_predict_output_to_a_fifo_nobody_reads_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    image = tmp_path / "a.png"
    image.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    done = _cli_process("predict", tiny_checkpoint, image, "--format", "csv", "--output", fifo)
    assert done.returncode == 2, done.stderr
    assert "no process is reading" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_fifo_where_the_tensor_cache_goes_is_refused_in_one_line(synthetic_root, tmp_path):
    env = {**os.environ, "CIFAR10_RESNET50_CACHE": str(tmp_path / "cache")}
    first = _cli_process("data", "info", "--data-dir", synthetic_root, env=env)
    assert first.returncode == 0, first.stderr
    [cached] = (tmp_path / "cache" / "tensors").glob("cifar10-*.pt")
    cached.unlink()
    os.mkfifo(cached)
    done = _cli_process("data", "info", "--data-dir", synthetic_root, env=env)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
