import csv
import io
import json
import subprocess
import sys

import numpy as np
import torch

from cifar10_resnet50.evaluation import evaluate
from cifar10_resnet50.serving import files, inference, predict
from corpus import write


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cifar10_resnet50", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_corpus_folder_predicts_good_files_and_rejects_bad_ones(tiny_checkpoint, tmp_path):
    expected = write(tmp_path / "corpus")
    proc = run_cli("predict", str(tiny_checkpoint), str(tmp_path / "corpus"), "--format", "json")
    assert proc.returncode == 2, proc.stderr  # some rejected
    assert "Traceback" not in proc.stderr
    rows = json.loads(proc.stdout)
    predicted = {r["path"].rsplit("/", 1)[-1] for r in rows}
    # Folders are searched for extensions Pillow knows: random.bin and drawing.svg are skipped.
    known = files.image_extensions()
    considered = {n: kind for n, kind in expected.items() if "." + n.rsplit(".", 1)[-1] in known}
    assert "random.bin" not in considered and "drawing.svg" not in considered
    good = {n for n, kind in considered.items() if kind is None}
    assert predicted == good
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    bad = {n for n, kind in considered.items() if kind is not None}
    assert len(errors) == len(bad)
    for name in bad:
        assert sum(name in line for line in errors) == 1, name
    for r in rows:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)


def test_all_good_files_exit_0_with_table_csv_and_output_file(tiny_checkpoint, test_pngs, tmp_path):
    paths, _ = test_pngs
    proc = run_cli("predict", str(tiny_checkpoint), *map(str, paths[:3]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("file") and len(proc.stdout.splitlines()) == 4
    out = tmp_path / "p.csv"
    proc = run_cli(
        "predict",
        str(tiny_checkpoint),
        str(paths[0].parent / "test0*.png"),
        "--format",
        "csv",
        "--top-k",
        "2",
        "--output",
        str(out),
    )
    assert proc.returncode == 0 and proc.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 10 * 2 and rows[0]["rank"] == "1"


def test_missing_paths_and_bad_model_are_one_line_errors(tiny_checkpoint, test_pngs, tmp_path):
    proc = run_cli(
        "predict", str(tiny_checkpoint), str(test_pngs[0][0]), str(tmp_path / "nope.png")
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr
    bogus = tmp_path / "m.pt"
    bogus.write_bytes(b"nope")
    proc = run_cli("predict", str(bogus), str(test_pngs[0][0]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_predict_agrees_with_evaluate(tiny_checkpoint, test_pngs):
    paths, tensors = test_pngs
    predictor = inference.load(tiny_checkpoint, batch_size=8)  # 24 images → 3 batches
    results = list(predict.predict_files(predictor, paths, top_k=1))
    from cifar10_resnet50 import checkpoint

    model, _ = checkpoint.load_model(tiny_checkpoint)
    logits = evaluate.predict_logits(
        model, tensors, batch_size=50, device=torch.device("cpu"), amp_dtype=None
    )
    expected = [predictor.classes[i] for i in logits.argmax(1).tolist()]
    assert [r.top[0][0] for r in results] == expected
    probs = torch.softmax(logits, 1).max(1).values.numpy()
    assert np.allclose([r.top[0][1] for r in results], probs, atol=1e-5)


def test_expand_handles_files_folders_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.PNG").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "y.jpg").write_bytes(b"1")
    found, missing = files.expand(
        [str(tmp_path / "a"), str(tmp_path / "*.jpg"), str(tmp_path / "z*.gif")]
    )
    assert [f.name for f in found] == ["x.PNG", "y.jpg"]
    assert len(missing) == 1 and "no files match" in missing[0].reason
