"""`predict` over many files (issue 20): decoding in worker processes in input order, results
streamed through FILE.partial, resume after a kill, shards, jsonl, the closing summary."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar10_resnet50.errors import UserError
from cifar10_resnet50.serving import bulk, files, inference, predict, results
from cifar10_resnet50.serving.files import Shard


def _write_images(folder: Path, n: int, bad: tuple[int, ...] = ()) -> list[Path]:
    """``n`` small PNGs in two sub-folders (so the walk recurses), the ``bad`` ones damaged."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"part{i % 2}" / f"img{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n damaged")
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(buf, "PNG")
            path.write_bytes(buf.getvalue())
        paths.append(path)
    return sorted(paths)


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cifar10_resnet50", "predict", *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env, **kw,
    )  # fmt: skip


def _run(predictor, paths, **kw):
    rejected = []
    options = dict(top_k=2, fmt="jsonl", output=None, workers=0, on_rejected=rejected.append)
    summary = bulk.run(predictor, [str(p) for p in paths], **{**options, **kw})
    return summary, rejected


def test_worker_processes_keep_input_order_and_count_rejects(tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    expected = _write_images(folder, 30, bad=(3, 17))
    predictor = inference.load(tiny_checkpoint, batch_size=4)
    in_process = list(predict.predict_files(predictor, files.iter_files([str(folder)], print), 2))
    in_workers = list(predict.predict_files(predictor, expected, 2, workers=2))
    assert [r.path for r in in_workers] == [str(p) for p in expected]  # input order
    assert in_workers == in_process  # same answers, whichever process decoded
    rejected = [r for r in in_workers if isinstance(r, files.Rejected)]
    assert [r.path for r in rejected] == [str(folder / "part1" / "img00003.png"),
                                           str(folder / "part1" / "img00017.png")]  # fmt: skip
    assert all("damaged or truncated" in r.reason and "img000" not in r.reason for r in rejected)


def test_jsonl_streams_to_a_partial_and_appears_complete(tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 12, bad=(5,))
    out = tmp_path / "preds.jsonl"
    done = _cli(tiny_checkpoint, folder, "--format", "jsonl", "--output", out, "--batch-size", "4",
                "--workers", "2")  # fmt: skip
    assert done.returncode == 2, done.stderr  # one file rejected
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 11 and set(rows[0]) == {"path", "width", "height", "top"}
    assert rows[0]["width"] == 32 and len(rows[0]["top"]) == 3
    assert not results.partial_path(out).exists() and not results.sidecar_path(out).exists()
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("predict: 12 files, 11 predicted, 1 rejected, ")
    assert "img/s" in summary


@pytest.mark.parametrize("fmt", ["json", "csv", "table", "jsonl"])
def test_every_format_streams_the_same_text_as_one_render(tiny_checkpoint, tmp_path, fmt):
    """Batches of 2 with a rejected file in between: the streamed text equals what one render
    of all rows gives (JSON byte for byte as json.dumps(rows, indent=2))."""
    paths = _write_images(tmp_path / "imgs", 7, bad=(0, 4))
    predictor = inference.load(tiny_checkpoint, batch_size=2)
    out = tmp_path / f"p.{fmt}"
    _run(predictor, paths, fmt=fmt, output=str(out))
    good = [r for r in predict.predict_files(predictor, paths, 2) if not hasattr(r, "reason")]
    whole = results.Progress({})
    text = results.opening(fmt) + results.render(good, fmt, whole) + results.closing(fmt, whole)
    assert out.read_bytes() == results.encode(text)
    if fmt == "json":
        assert text == json.dumps([results._row(p) for p in good], indent=2) + "\n"
    if fmt == "table":
        assert len(text.splitlines()) == 1 + 5
    empty = results.Progress({})
    assert results.render([], "json", empty) + results.closing("json", empty) == "[]\n"


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "cifar10_resnet50", "predict", *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # Ctrl-C's default action, as in a terminal: a test runner started in the background
        # (`bash .ci/run &`) ignores SIGINT, and children inherit that (CI failed on it once).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _once_progress_is_recorded(proc, sidecar: Path) -> dict:
    deadline = time.time() + 240
    while True:
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):  # not written yet
            record = {}
        if record.get("files_done"):
            return record
        assert proc.poll() is None and time.time() < deadline, "no progress recorded in time"
        time.sleep(0.05)


def test_ctrl_c_or_sigkill_mid_run_then_resume_gives_the_uninterrupted_output(
    tiny_checkpoint, tmp_path
):
    folder = tmp_path / "imgs"
    _write_images(folder, 900, bad=(7, 700))
    args = [tiny_checkpoint, folder, "--format", "csv", "--batch-size", "16", "--workers", "1",
            "--threads", "1"]  # fmt: skip
    full = _cli(*args, "--output", tmp_path / "full.csv")
    assert full.returncode == 2, full.stderr
    out = tmp_path / "part.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sidecar = results.sidecar_path(out)
    # Ctrl-C in a terminal: SIGINT to the whole group, the decoding workers too.
    proc = _start([*args, "--output", out], env)
    _once_progress_is_recorded(proc, sidecar)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "run the same command with --resume" in err
    # A kill mid-run (no chance to clean up), while resuming.
    proc = _start([*args, "--output", out, "--resume"], env)
    first = json.loads(sidecar.read_text())["files_done"]
    record = _once_progress_is_recorded(proc, sidecar)
    while record["files_done"] == first:
        record = json.loads(sidecar.read_text())
        assert proc.poll() is None, "finished before the kill"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    record = json.loads(sidecar.read_text())
    assert first < record["files_done"] < 900 and not out.exists()
    # A torn write after the last record: resume must cut it away.
    with open(results.partial_path(out), "ab") as f:
        f.write(b"/torn/line.png,32,3")
    again = _cli(*args, "--output", out)
    assert again.returncode == 2 and "holds the results of an unfinished run" in again.stderr
    resumed = _cli(*args, "--output", out, "--resume")
    assert resumed.returncode == 2, resumed.stderr  # the damaged files are rejected again
    assert out.read_bytes() == (tmp_path / "full.csv").read_bytes()
    assert f"{record['files_done']:,} were done before" in resumed.stderr
    assert not sidecar.exists()


def test_resume_refuses_other_settings_and_a_changed_input(tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    paths = _write_images(folder, 6)
    predictor = inference.load(tiny_checkpoint, batch_size=2)
    out = tmp_path / "p.jsonl"
    record = bulk.settings_record(predictor.path, [str(folder)], "jsonl", 2, None)
    partial = results.open_output(str(out), record, resume=False)
    first = predict.Prediction(str(paths[0]), [("cat", 1.0)], 32, 32)
    partial.write(results.render([first], "jsonl", partial.progress), [str(paths[0])], 0)
    partial.close()  # as after a Ctrl-C: what was written is committed
    with pytest.raises(UserError, match="other settings \\(top_k\\)"):
        _run(predictor, [folder], output=str(out), resume=True, top_k=3)
    paths[0].unlink()  # the file the partial run did first is gone
    with pytest.raises(UserError, match="input changed"):
        _run(predictor, [folder], output=str(out), resume=True)
    with pytest.raises(UserError, match="--resume continues an --output file"):
        _run(predictor, [folder], resume=True)


def test_shards_partition_the_files_exactly(tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 40)
    predictor = inference.load(tiny_checkpoint, batch_size=8)
    whole, _ = _run(predictor, [folder], output=str(tmp_path / "all.jsonl"))
    rows = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    every = rows(tmp_path / "all.jsonl")
    parts = []
    for k in (1, 2, 3):
        _run(predictor, [folder], output=str(tmp_path / f"{k}.jsonl"), shard=Shard(k, 3))
        parts.append(rows(tmp_path / f"{k}.jsonl"))
    assert all(parts) and sum(len(p) for p in parts) == len(every) == 40  # no overlap, no gap
    assert sorted(r["path"] for p in parts for r in p) == sorted(r["path"] for r in every)
    by_path = {r["path"]: r for r in every}
    assert all(by_path[r["path"]] == r for p in parts for r in p)  # the same answers
    for bad in ("3", "0/2", "3/2", "a/b"):
        with pytest.raises(UserError, match="--shard"):
            Shard.parse(bad)


def test_an_input_image_found_in_a_folder_is_never_the_output(tiny_checkpoint, tmp_path):
    paths = _write_images(tmp_path / "imgs", 4)
    done = _cli(tiny_checkpoint, tmp_path / "imgs", "--output", paths[2])
    assert done.returncode == 2 and "is one of the input images" in done.stderr
    assert Image.open(paths[2]).size == (32, 32)  # untouched


def test_the_walk_streams_in_sorted_order(tmp_path):
    for rel in ("b/2.png", "b/10.png", "a.png", "b c/1.png", "b.png", "b/x/0.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    walked = list(files.walk(tmp_path))
    assert walked == sorted(walked) and len(walked) == 6


def test_tta_averages_each_image_with_its_mirror_for_every_backend(tiny_checkpoint, tmp_path):
    paths = _write_images(tmp_path / "imgs", 3)
    predictor = inference.load(tiny_checkpoint)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    expected = (predictor.probabilities(pixels) + predictor.probabilities(pixels[:, :, ::-1])) / 2
    assert not np.allclose(expected, predictor.probabilities(pixels))  # the mirror differs
    [with_tta] = [r for r in predict.predict_batches(predictor, paths, 10, tta=True)]
    for result, row in zip(with_tta, expected, strict=True):
        assert dict(result.top) == pytest.approx(
            dict(zip(predictor.classes, row.tolist(), strict=True))
        )
    out = tmp_path / "tta.jsonl"
    done = _cli(tiny_checkpoint, *paths, "--tta", "--format", "jsonl", "--output", out,
                "--top-k", "10")  # fmt: skip
    assert done.returncode == 0, done.stderr
    top = {t["label"]: t["probability"] for t in json.loads(out.read_text().splitlines()[0])["top"]}
    assert top == pytest.approx(
        dict(zip(predictor.classes, expected[0].tolist(), strict=True)), abs=1e-6
    )


def test_a_kill_between_the_closing_text_and_the_rename_resumes_to_valid_json(
    tiny_checkpoint, tmp_path, monkeypatch
):
    folder = tmp_path / "imgs"
    _write_images(folder, 3)
    predictor = inference.load(tiny_checkpoint, batch_size=2)
    out = tmp_path / "p.json"
    monkeypatch.setattr(results, "COMMIT_EVERY_S", 0.0)  # a record after every write

    real_replace = os.replace

    def killed(src, dst, **kw):
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt  # the run dies just before FILE.partial becomes FILE
        return real_replace(src, dst, **kw)  # the record's own atomic writes go on

    with monkeypatch.context() as m:
        m.setattr(results.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(predictor, [folder], fmt="json", output=str(out))
    assert not out.exists() and results.partial_path(out).read_text().endswith("\n]\n")
    _run(predictor, [folder], fmt="json", output=str(out), resume=True)
    assert len(json.loads(out.read_text())) == 3  # the closing bracket once
