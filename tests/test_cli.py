import json
import shutil
import subprocess
import sys

import pytest

from cifar10_resnet50.cli import main


def run_cli(*args, env=None, timeout=300):
    """The CLI in its own process; ``timeout`` only guards against a hang."""
    return subprocess.run(
        [sys.executable, "-m", "cifar10_resnet50", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("command", [[], ["data"], ["train"], ["evaluate"]])
def test_help_works_and_does_not_import_torch(command):
    code = (
        "import sys\n"
        "from cifar10_resnet50.cli import main\n"
        "try:\n"
        f"    main({command + ['--help']!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: cifar10-resnet50" in proc.stdout


def test_train_help_lists_the_flags_that_matter(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--strategy",
        "--weights",
        "--image-size",
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--out",
        "--device",
        "--precision",
        "--subset",
        "--config",
        "--resume",
        "--compile",
        "--mixup",
        "--cutmix",
        "--val-size",
        "--data-dir",
    ):
        assert flag in text, flag


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_data_verify_on_a_broken_folder_is_a_one_line_error(synthetic_copy):
    (synthetic_copy / "cifar-10-batches-py" / "data_batch_5").write_bytes(b"\x80\x04trunc")
    proc = run_cli("data", "verify", "--data-dir", str(synthetic_copy))
    _one_line_error(proc, "data_batch_5 is unreadable")


def test_data_verify_and_info_on_a_good_folder(synthetic_root):
    proc = run_cli("data", "verify", "--data-dir", str(synthetic_root))
    assert proc.returncode == 0 and "valid CIFAR-10 structure" in proc.stdout
    proc = run_cli("data", "info", "--data-dir", str(synthetic_root))
    assert proc.returncode == 0 and "(50000, 3, 32, 32) uint8" in proc.stdout


def test_train_without_data_and_without_download_says_how_to_fix(tmp_path):
    proc = run_cli(
        "train",
        "--data-dir",
        str(tmp_path),
        "--no-download",
        "--weights",
        "none",
        "--out",
        str(tmp_path / "r"),
    )
    _one_line_error(proc, "data download")


def test_bad_flag_values_are_one_line_errors(tmp_path, synthetic_root):
    proc = run_cli(
        "train", "--data-dir", str(synthetic_root), "--val-size", "-3", "--out", str(tmp_path / "r")
    )
    _one_line_error(proc, "--val-size")
    proc = run_cli("train", "--resume")
    _one_line_error(proc, "--resume needs --out")
    proc = run_cli(
        "train",
        "--weights",
        str(tmp_path / "missing.pth"),
        "--data-dir",
        str(synthetic_root),
        "--out",
        str(tmp_path / "r2"),
    )
    _one_line_error(proc, "no such file")


def test_evaluate_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("hello")
    _one_line_error(run_cli("evaluate", str(bogus)), "is not a checkpoint")


def test_train_then_evaluate_end_to_end(synthetic_root, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--data-dir",
        str(synthetic_root),
        "--no-download",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--subset",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--val-size",
        "50",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "truck" in proc.stdout  # the test table
    assert "epoch 1/1" in proc.stderr  # the per-epoch summary line
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["count"] == 10000 and len(metrics["per_class_accuracy"]) == 10
    confusion = json.loads((out / "eval" / "confusion.json").read_text())["rows_true_cols_pred"]
    assert [sum(row) for row in confusion] == [1000] * 10
    assert (out / "eval" / "confusion.png").stat().st_size > 0

    proc = run_cli(
        "evaluate",
        str(out / "best.pt"),
        "--data-dir",
        str(synthetic_root),
        "--tta",
        "--out",
        str(tmp_path / "ev"),
        "--test-images",
        "1000",
    )
    assert proc.returncode == 0, proc.stderr
    assert "TTA flip" in proc.stdout
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta"] == "flip"
    assert "1000 of 10000 test images (--test-images)" in proc.stderr


def test_ctrl_c_saves_last_and_resume_finishes_the_run(synthetic_root, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = [
        "train", "--data-dir", str(synthetic_root), "--no-download", "--weights", "none",
        "--image-size", "32", "--subset", "512", "--batch-size", "16", "--epochs", "1",
        "--val-size", "20", "--device", "cpu", "--no-progress", "--out", str(out),
        "--checkpoint-every", "4", "--test-images", "200",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar10_resnet50", *args], stderr=subprocess.PIPE, text=True
    )
    # Signal once the run has steps behind it: --checkpoint-every 4 writes last.pt at step 4
    # (a wait on evidence, not on a guess of this machine's speed).
    deadline = time.monotonic() + 300  # only a guard against a hang
    while not (out / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, rest
    assert "Traceback" not in rest and "--resume" in rest
    from cifar10_resnet50 import checkpoint

    state = checkpoint.load(out / "last.pt")["train_state"]
    stopped_at = int(rest.split("stopped at epoch 1, batch ")[1].split(";")[0])
    assert state["epoch"] == 0 and 4 <= state["batch"] == stopped_at < 32
    # A generous guard: with two busy loops on 2 cores a step took 5 s here (not ~0.05 s).
    done = run_cli(*args, "--resume", timeout=900)
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(out / "last.pt")["train_state"]["epoch"] == 1


def test_serving_and_export_never_import_training_code():
    """The layering the package tree shows: serving imports neither training nor evaluation."""
    code = (
        "import sys\n"
        "from cifar10_resnet50.serving import export, inference, predict, serve\n"
        "bad = [m for m in sys.modules\n"
        "       if m.startswith(('cifar10_resnet50.training', 'cifar10_resnet50.evaluation'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["predict", "m.pt", "x.png", "--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["predict", "m.pt", "x.png", "--top-k", "0"], "--top-k: 0 is out of range"),
        (["predict", "m.pt", "x.png", "--threads", "-1"], "--threads: -1 is out of range"),
        (["evaluate", "m.pt", "--batch-size", "0"], "--batch-size: 0 is out of range"),
        (["export", "m.pt", "--format", "onnx", "--parity-images", "-1"], "--parity-images"),
        (["serve", "m.pt", "--port", "99999"], "--port: 99999 is out of range: must be an integer"),
        (["serve", "m.pt", "--max-batch", "0"], "--max-batch: 0 is out of range"),
        (["serve", "m.pt", "--queue-size", "-1"], "--queue-size: -1 is out of range"),
        (["serve", "m.pt", "--timeout", "0"], "--timeout: 0 is out of range: must be a number > 0"),
        (["serve", "m.pt", "--max-wait-ms", "-5"], "--max-wait-ms: -5 is out of range"),
        (["serve", "m.pt", "--max-body-mb", "x"], "--max-body-mb: 'x' is not a number"),
    ],
)
def test_out_of_range_numbers_are_usage_errors_before_any_work(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_unwritable_output_paths_fail_at_once_with_one_line(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for args in (
        ["evaluate", str(tiny_checkpoint), "--out", str(blocker / "eval")],
        ["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(blocker / "m.onnx")],
        ["predict", str(tiny_checkpoint), str(blocker), "--output", str(blocker / "p.csv")],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and str(blocker) in lines[0] and "Not a directory" in lines[0], err


def test_serve_on_a_busy_port_is_a_one_line_error(tiny_checkpoint, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and "--port" in err, err


def test_serve_flags_come_from_serve_config_with_their_ranges():
    from cifar10_resnet50 import cli
    from cifar10_resnet50.declare import flags
    from cifar10_resnet50.serving.settings import ServeConfig

    args = cli.parse_args(["serve", "m.pt", "--max-body-mb", "2", "--decode-workers", "3"])
    settings = ServeConfig(**{key: getattr(args, key) for _, key, _ in flags(ServeConfig)})
    assert settings.max_body_bytes == 2 * 2**20 and settings.decode_workers == 3
    assert settings.max_header_bytes == ServeConfig().max_header_kb * 1024
    assert (
        settings.access_log and not cli.parse_args(["serve", "m.pt", "--no-access-log"]).access_log
    )
    for bad in (["--timeout", "0"], ["--max-batch", "0"], ["--max-wait-ms", "-1"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["serve", "m.pt", *bad])


def test_evaluate_takes_a_run_folder_and_tta_keeps_the_report_without_it(
    tiny_checkpoint, synthetic_root, tmp_path, capsys
):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "best.pt")
    (run / "eval" / "metrics.json").write_text('{"from": "training"}')
    code = main(
        ["evaluate", str(run), "--tta", "--data-dir", str(synthetic_root), "--device", "cpu",
         "--test-images", "500"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (run / "eval" / "metrics.json").read_text() == '{"from": "training"}'
    tta = json.loads((run / "eval-tta" / "metrics.json").read_text())
    assert tta["tta"] == "flip" and tta["count"] == 500  # --test-images: a stratified 500
    confusion = json.loads((run / "eval-tta" / "confusion.json").read_text())
    assert [sum(row) for row in confusion["rows_true_cols_pred"]] == [50] * 10


def test_lr_find_offers_only_the_flags_it_uses(capsys):
    from cifar10_resnet50 import cli

    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    text = capsys.readouterr().out
    assert "--lr" in text and "--mixup" in text
    assert all(flag not in text for flag in ("--budget", "--progressive", "--checkpoint-every"))
    with pytest.raises(SystemExit):
        cli.parse_args(["lr-find", "--budget", "2m"])


def test_data_actions_all_take_no_progress(synthetic_root, capsys):
    for action in ("verify", "info"):
        assert main(["data", action, "--data-dir", str(synthetic_root), "--no-progress"]) == 0


def test_an_output_folder_the_system_refuses_is_named_plainly(tiny_checkpoint, capsys):
    assert main(["evaluate", str(tiny_checkpoint), "--out", "/proc/run"]) == 2
    err = capsys.readouterr().err  # before: "/proc: No such file or directory"
    assert "/proc/run: cannot be created in /proc" in err and len(err.splitlines()) == 1, err


def test_an_svg_given_to_predict_is_explained_in_the_cli_s_words(tiny_checkpoint, tmp_path, capsys):
    svg = tmp_path / "logo.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"></svg>')
    main(["predict", str(tiny_checkpoint), str(svg)])
    out = capsys.readouterr()
    assert "convert it to PNG or JPEG" in out.out + out.err and "send" not in out.out + out.err
