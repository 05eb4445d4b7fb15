"""A new user's first hour: each stumble found by following the README from a fresh clone,
pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_resnet50 import cli
from cifar10_resnet50 import config as C

ROOT = Path(__file__).resolve().parents[1]


def _main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


TINY = [
    "--weights", "none", "--image-size", "32", "--subset", "64", "--val-size", "0",
    "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--no-progress",
]  # fmt: skip


def test_the_printed_resume_command_works_for_a_run_without_out(
    capsys, synthetic_root, tmp_path, monkeypatch
):
    from cifar10_resnet50.training import train

    monkeypatch.chdir(tmp_path)
    cfg = C.override(
        C.Config(),
        {"data.data_dir": str(synthetic_root), "data.subset": 64, "data.val_size": 0,
         "model.weights": "none", "model.image_size": 32, "train.epochs": 1,
         "train.batch_size": 32, "train.device": "cpu", "train.progress": False},
    )  # fmt: skip
    stopped = train.run(cfg, final_eval=False, stop_after_steps=1)
    assert stopped.stopped_early and stopped.out_dir.parent == Path("runs")
    # Exactly what cmd_train prints: "continue with: cifar10-resnet50 train --resume --out RUN"
    code, out, err = _main(
        capsys, "train", "--resume", "--out", stopped.out_dir, "--data-dir", synthetic_root
    )
    assert code == 0, err
    assert "accuracy" in out
    # 5: resuming the finished run says so and changes nothing.
    files = {p: p.stat().st_mtime_ns for p in stopped.out_dir.rglob("*") if p.is_file()}
    code, out, err = _main(capsys, "train", "--resume", "--out", stopped.out_dir)
    assert code == 0 and "is finished (1 epochs); nothing was changed" in out
    assert f"--out {stopped.out_dir} --epochs 6" in out
    assert files == {p: p.stat().st_mtime_ns for p in stopped.out_dir.rglob("*") if p.is_file()}


def test_setup_script_installs_once_then_returns_at_once(tmp_path):
    """A fake venv whose python records its calls: the second run must not call pip."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "VENV": str(venv)}
    for _ in range(2):
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, check=True)
    calls = log.read_text().splitlines()
    assert sum("pip install" in c for c in calls) == 1, calls


def test_a_data_dir_that_does_not_exist_is_an_error_not_a_download(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "typo" / "cifar"
    code, _, err = _main(capsys, "train", "--data-dir", missing, *TINY)
    assert code == 2 and "does not exist" in err and "data download" in err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "runs").exists()


def test_failed_starts_leave_no_run_folder_and_evaluate_no_eval_folder(
    capsys, tmp_path, monkeypatch, tiny_checkpoint
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _, err = _main(capsys, "train", "--data-dir", tmp_path / "empty", "--no-download", *TINY)
    assert code == 2 and "no CIFAR-10" in err
    assert not (tmp_path / "runs").exists()
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG not really")
    code, _, err = _main(capsys, "evaluate", image)
    assert code == 2 and not (tmp_path / "eval").exists()


def test_bad_flag_values_are_rejected_before_torch_is_imported():
    script = (
        "import sys\n"
        "from cifar10_resnet50 import cli\n"
        "codes = [cli.main(a.split()) for a in ("
        "'train --lr -1', 'train --epochs 0', 'train --weights imagenett', 'train --threads 0')]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "[2, 2, 2, 2] False", done.stderr
    assert "--weights 'imagenett': not one of imagenet, imagenet-v1, none" in done.stderr


def test_help_is_complete_and_unknown_flags_get_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "download", "--help"])
    assert "Fetch the official archive" in capsys.readouterr().out
    cli.build_parser()
    for name, parser in cli._SUBPARSERS.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"
    for typo, meant in (("--epocs", "--epochs"), ("--epoch", "--epochs")):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", typo, "3"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"did you mean {meant}?" in err and "--help" in err
        assert len(err.strip().splitlines()) == 1, err  # not 23 lines of usage first


def test_train_threads_sets_torch_threads(synthetic_root, tmp_path):
    import torch

    from cifar10_resnet50.training import train

    before = torch.get_num_threads()
    cfg = C.override(
        C.Config(),
        {"data.data_dir": str(synthetic_root), "data.subset": 64, "data.val_size": 0,
         "model.weights": "none", "model.image_size": 32, "train.epochs": 1,
         "train.batch_size": 32, "train.device": "cpu", "train.progress": False,
         "train.threads": 1, "train.out": str(tmp_path / "run")},
    )  # fmt: skip
    try:
        train.run(cfg, final_eval=False, stop_after_steps=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["threads"] == 1


def test_server_and_cli_agree_on_top_k_and_json_fields(capsys, tiny_checkpoint, test_pngs):
    from fastapi.testclient import TestClient

    from cifar10_resnet50.serving import inference, serve

    paths, _ = test_pngs
    with TestClient(serve.create_app(lambda: inference.load(tiny_checkpoint))) as c:
        while c.get("/readyz").status_code != 200:
            pass
        zero = c.post("/predict?top_k=0", content=paths[0].read_bytes())
        assert zero.status_code == 422 and zero.json()["error"]["code"] == "invalid_request"
        served = c.post("/predict", content=paths[0].read_bytes()).json()["predictions"][0]
    with pytest.raises(SystemExit):
        cli.main(["predict", str(tiny_checkpoint), str(paths[0]), "--top-k", "0"])
    capsys.readouterr()
    code, out, _ = _main(capsys, "predict", tiny_checkpoint, paths[0], "--format", "json")
    row = json.loads(out)[0]
    assert code == 0 and (row["width"], row["height"]) == (served["width"], served["height"])


def test_evaluate_says_which_precision_it_used(capsys, tiny_checkpoint, synthetic_root, tmp_path):
    code, out, _ = _main(
        capsys, "evaluate", tiny_checkpoint, "--data-dir", synthetic_root, "--out", tmp_path,
        "--precision", "fp32", "--batch-size", "1000", "--test-images", "500",
    )  # fmt: skip
    assert code == 0 and "precision fp32" in out


def test_first_setup_says_what_it_installs_and_shows_pip_progress(tmp_path):
    """The first install is minutes of downloads: it must not be silent (it was `pip -q`).
    A stand-in python records the calls and prints what pip prints."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2 $3" = "-m pip install" ]; then\n'
        '  echo "Collecting torch==2.14.1"; echo "  Downloading torch-2.14.1.whl (2.5 GB)"\n'
        '  echo "Requirement already satisfied: numpy"; exit 0\n'
        "fi\n"
        'case "$*" in *find_spec*) exit 1;; esac\n'  # "not installed yet"
        "exit 0\n"
    )
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True,
                          text=True, env={**os.environ, "VENV": str(venv)}, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "setup: installing torch" in done.stderr
    assert "Collecting torch==2.14.1" in done.stderr and "Downloading torch" in done.stderr
    assert "already satisfied" not in done.stderr  # progress, not pip's whole chatter
