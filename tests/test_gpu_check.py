"""The device check (``benchmarks/gpu_check.sh``) in its CPU smoke mode: every row runs, at
tiny sizes, so the script cannot rot between GPU loans (each loan is ~15 minutes in all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Packages we depend on that the GPU machine's image does not hold (the device README's
# KINDS.md package list, 2026-11-17): the check runs there on the image's own python3, so none
# of its rows may need them. A sitecustomize makes importing them fail in every process.
ABSENT_ON_THE_DEVICE = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart")


def _without_device_absent_packages(folder: Path) -> str:
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        f"import sys\nfor name in {ABSENT_ON_THE_DEVICE!r}:\n    sys.modules[name] = None\n"
    )
    return str(folder)


def test_the_device_check_runs_every_row_and_records_each_as_it_goes(synthetic_root, tmp_path):
    path = os.pathsep.join([_without_device_absent_packages(tmp_path / "site"), str(ROOT / "src")])
    env = {**os.environ, "PYTHONPATH": path, "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable}  # fmt: skip
    env.pop("CIFAR10_DATA_DIR", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--data", str(synthetic_root)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    printed = [json.loads(x[4:]) for x in done.stdout.splitlines() if x.startswith("ROW ")]
    assert rows == printed  # every row printed as it was written
    by_what = {r["what"]: r for r in rows}
    assert not [r for r in rows if "failed" in r], rows
    assert rows[0]["what"] == "machine" and rows[-1]["what"] == "done"
    train = by_what["train defaults, 3 epochs"]
    assert train["img_per_s"] > 0 and 0 < train["whole_run_img_per_s"] <= train["img_per_s"]
    assert [set(s) for s in train["time_split_s"]] == [{"train", "validate", "save", "other"}] * 3
    ddp = by_what["2 processes on one device (gloo), DDP + --sync-bn, 1 epoch"]
    assert ddp["img_per_s"] > 0
    assert by_what["predict, 64 PNG files"]["files"] == 64
    assert by_what["evaluate, the test set"]["images"] == 50  # the smoke folder's test split
    assert any(w.startswith("tutorial + AMP") and r["img_per_s"] > 0 for w, r in by_what.items())


def test_the_device_check_names_the_preparation_when_the_data_was_not_carried(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke", "--data",
         str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "copy ../shared/cifar10-compact into gpu-data/" in done.stderr
