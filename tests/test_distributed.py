"""torchrun on the CPU (gloo): 2 processes, 2 "nodes" on 127.0.0.1, a killed rank, Ctrl-C to
the launcher and resume. Each launch starts fresh Python processes (~5 s each here)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar10_resnet50 import checkpoint
from cifar10_resnet50.config import AugmentConfig
from cifar10_resnet50.data import augment

WORKER = str(Path(__file__).with_name("dist_worker.py"))
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "CIFAR10_DIST_TIMEOUT": "60"}
    env.pop("CIFAR10_DATA_DIR", None)
    return env


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        *(extra or ("--standalone",)), *args,
    ]  # fmt: skip


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_one_model_with_identical_weights(synthetic_root, tmp_path):
    out = tmp_path / "run"
    done = _run(torchrun(WORKER, str(out), str(synthetic_root), "16"))
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = torch.load(tmp_path / "run.rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "run.rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = checkpoint.load(out / "last.pt")
    assert not any(k.startswith("module.") for k in saved["model"])  # a plain checkpoint
    assert all(torch.equal(saved["model"][k], r0[k]) for k in r0)
    assert saved["train_state"]["world_size"] == 2
    assert "batch 16 × 2 process(es) = 32" in done.stderr


def test_accumulation_and_ema_under_ddp_keep_every_rank_identical(synthetic_root, tmp_path):
    """2 processes × 8 images × --accum-steps 2 (DDP all-reduces only each step's last chunk)
    with --ema: both ranks end with the same weights and the same averaged weights (BatchNorm
    statistics averaged over ranks for both), and last.pt holds rank 0's."""
    out = tmp_path / "run"
    done = _run(torchrun(WORKER, str(out), str(synthetic_root), "8", "--accum-steps", "2",
                         "--ema", "0.9"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 8 × 2 accumulated × 2 process(es) = 32" in done.stderr
    for name in ("run.rank{}.pt", "run.rank{}.evaluated.pt"):
        r0, r1 = (torch.load(tmp_path / name.format(r), weights_only=True) for r in (0, 1))
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), name
    saved = checkpoint.load(out / "last.pt")["train_state"]["ema"]
    evaluated = torch.load(tmp_path / "run.rank0.evaluated.pt", weights_only=True)
    assert saved["updates"] == 4  # 128 training images (--subset) / 32 per step
    assert all(torch.equal(saved["weights"][k], evaluated[k]) for k in evaluated)


def test_sync_bn_steps_match_one_process_at_the_same_global_batch(synthetic_root, tmp_path):
    """2 processes × 16 with --sync-bn see the same images, crops and statistics as one
    process × 32, so the losses agree up to float summation order (< 1e-4 here)."""
    two = _run(torchrun(WORKER, str(tmp_path / "two"), str(synthetic_root), "16", "--sync-bn",
                        "--stop-after", "3"))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run([sys.executable, WORKER, str(tmp_path / "one"), str(synthetic_root), "32",
                "--stop-after", "3"])  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((tmp_path / "one.rank0.losses.json").read_text())
    ranks = [json.loads((tmp_path / f"two.rank{r}.losses.json").read_text()) for r in (0, 1)]
    combined = [(a + b) / 2 for a, b in zip(*ranks, strict=True)]  # DDP averages the ranks
    assert len(single) == len(combined) == 3
    for s, c in zip(single, combined, strict=True):
        assert abs(s - c) < 1e-4 * max(1.0, abs(s)), (single, combined)


def test_two_nodes_on_loopback_train_together(synthetic_root, tmp_path):
    port = _free_port()
    out = tmp_path / "run"
    cmds = [
        torchrun(WORKER, str(out), str(synthetic_root), "16", nproc=1,
                 extra=("--nnodes=2", f"--node-rank={node}", "--master-addr=127.0.0.1",
                        f"--master-port={port}"))
        for node in (0, 1)
    ]  # fmt: skip
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]  # fmt: skip
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert checkpoint.load(out / "last.pt")["train_state"]["world_size"] == 2


def test_killing_one_rank_stops_the_other_quickly(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cmd = torchrun("-m", "cifar10_resnet50", "train", "--data-dir", str(synthetic_root),
                   "--weights", "none", "--image-size", "32", "--subset", "2048", "--batch-size",
                   "16", "--epochs", "3", "--device", "cpu", "--no-progress", "--no-tensorboard",
                   "--checkpoint-every", "2", "--out", str(out))  # fmt: skip
    launcher = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert time.time() < deadline and launcher.poll() is None, "training never started"
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    workers = sorted(int(p) for p in children.stdout.split())
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    t0 = time.time()
    output = launcher.communicate(timeout=90)[0]
    assert launcher.returncode != 0 and time.time() - t0 < 60
    assert "SIGKILL" in output or "exitcode" in output  # torchrun names the failed rank
    assert 'cifar10_resnet50/training/train.py", line' not in output  # no traceback through it


def test_ctrl_c_to_the_launcher_saves_and_resume_matches_an_uninterrupted_run(
    synthetic_root, tmp_path
):
    # 256 images = 8 steps of 2 × 16 per epoch, 16 in all: the stop lands inside the run (the
    # signal follows the save at step 3), and CI pays for 16 steps three times, not 32.
    args = ["-m", "cifar10_resnet50", "train", "--data-dir", str(synthetic_root), "--weights",
            "none", "--image-size", "32", "--subset", "256", "--batch-size", "16", "--epochs",
            "2", "--val-size", "64", "--device", "cpu", "--no-progress", "--no-tensorboard",
            "--optimizer", "adamw", "--test-images", "200"]  # fmt: skip
    full = _run(torchrun(*args, "--out", str(tmp_path / "full")), timeout=400)
    assert full.returncode == 0, full.stderr[-3000:]
    # The other rank has finished: rank 0 evaluates on both cores, not torchrun's one thread.
    assert "final evaluation on rank 0 with 2 CPU threads" in full.stderr
    part = tmp_path / "part"
    launcher = subprocess.Popen(
        # --checkpoint-every 3: last.pt at step 3 is the evidence to signal on (each save of
        # AdamW's ~280 MB costs ~1 s here, so the other two runs save per epoch only).
        torchrun(*args, "--out", str(part), "--checkpoint-every", "3"), env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (part / "last.pt").exists():
        assert time.time() < deadline and launcher.poll() is None, "training never started"
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C in the launcher's terminal sends it
    output = launcher.communicate(timeout=120)[0]
    saved = checkpoint.load(part / "last.pt")["train_state"]
    assert 0 < saved["step"] < 16, output[-2000:]  # stopped inside the run, and saved
    assert "saving 'last'" in output
    resumed = _run(torchrun(*args, "--out", str(part), "--resume"), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = checkpoint.load(tmp_path / "full" / "last.pt")["model"]
    b = checkpoint.load(part / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_without_saving(synthetic_root, tmp_path):
    out = tmp_path / "run"
    done = _run(torchrun(WORKER, str(out), str(synthetic_root), "16", "--nan-at", "2"))
    assert done.returncode != 0
    assert "rank 1 error: loss became nan at step 2" in done.stderr
    assert "rank 0 error: another process's loss became NaN/inf" in done.stderr
    assert not (out / "last.pt").exists()  # nothing saved from a diverged state


def test_ranks_that_measure_different_times_still_plan_the_same_budget(synthetic_root, tmp_path):
    """--budget's plan depends on timings; rank 1's clock runs 3× as fast, so alone the ranks
    would plan different epochs and steps (and a rank would skip collectives the other runs:
    a hang). Every timing is agreed first: both follow one plan."""
    out = tmp_path / "run"
    args = (WORKER, str(out), str(synthetic_root), "16", "--budget", "2h", "--stop-after", "1")
    done = _run(torchrun(*args))
    assert done.returncode == 0, done.stderr[-3000:]
    plans = [json.loads((tmp_path / f"run.rank{r}.plan.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1] and plans[0]["epochs"] > 1, plans


def test_resume_with_another_process_count_is_refused(synthetic_root, tmp_path):
    out = tmp_path / "run"
    done = _run(torchrun(WORKER, str(out), str(synthetic_root), "16", "--stop-after", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    single = _run(
        [sys.executable, "-m", "cifar10_resnet50", "train", "--resume", "--out", str(out)]
    )
    assert single.returncode == 2
    assert "trained by 2 process(es) and is resumed by 1" in single.stderr


@pytest.mark.parametrize("world", [2])
def test_global_batches_are_sliced_from_one_augmented_batch(world):

    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64) % 10
    kw = dict(seed=3, epoch=1, recipe=AugmentConfig(mixup=0.4, cutmix=1.0), num_classes=10)
    whole = list(augment.train_batches(x, y, batch_size=8 * world, **kw))
    parts = [list(augment.train_batches(x, y, batch_size=8, rank=r, world_size=world, **kw))
             for r in range(world)]  # fmt: skip
    for i, (_, xb, yb, tb) in enumerate(whole):
        assert torch.equal(xb, torch.cat([p[i][1] for p in parts]))
        assert torch.equal(yb, torch.cat([p[i][2] for p in parts]))
        assert torch.equal(tb, torch.cat([p[i][3] for p in parts]))


def _two_fake_gpus(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_local_rank_beyond_the_visible_gpus_is_a_one_line_error(monkeypatch):
    from cifar10_resnet50.errors import UserError
    from cifar10_resnet50.runtime import pick_device

    _two_fake_gpus(monkeypatch)
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="LOCAL_RANK 2 but 2 GPU.*--nproc-per-node 2.*=gloo"):
        pick_device("cuda", local_rank=2)
    # Sharing is allowed only when asked for (gloo): rank 2 then shares GPU 0.
    assert pick_device("cuda", local_rank=2, shared_gpu=True) == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [(None, "cuda", "nccl"), (None, "cpu", "gloo"), ("gloo", "cuda", "gloo"), ("GLOO", "cpu", "gloo"),
     ("mpi", "cuda", "must be one of nccl, gloo"), ("nccl", "cpu", "nccl needs CUDA GPUs")],
)  # fmt: skip
def test_the_backend_follows_the_device_unless_the_variable_says(
    monkeypatch, setting, device, expected
):
    from cifar10_resnet50.errors import UserError
    from cifar10_resnet50.runtime import BACKEND_VARIABLE, dist_backend

    if setting is None:
        monkeypatch.delenv(BACKEND_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(BACKEND_VARIABLE, setting)
    if expected in ("nccl", "gloo"):
        assert dist_backend(device) == expected
    else:
        with pytest.raises(UserError, match=expected):
            dist_backend(device)


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_torchrun_processes_bind_their_own_gpu_or_share_one_under_gloo(monkeypatch, backend):
    """Under NCCL each process takes GPU LOCAL_RANK and tells init_process_group (device_id);
    with CIFAR10_DIST_BACKEND=gloo, 3 processes share 2 GPUs (DDP/SyncBN on a small machine)."""
    from cifar10_resnet50.runtime import BACKEND_VARIABLE, Process

    _two_fake_gpus(monkeypatch)
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(set_device=d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda b, **kw: calls.update(backend=b, **kw)
    )
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2" if backend == "gloo" else "1")
    monkeypatch.setenv(BACKEND_VARIABLE, backend)
    process = Process.from_env("cuda")
    assert process.backend == calls["backend"] == backend
    if backend == "nccl":
        assert calls["set_device"] == calls["device_id"] == torch.device("cuda", 1)
    else:
        assert calls["set_device"] == torch.device("cuda", 0) and calls["device_id"] is None
        assert process.device("cuda") == torch.device("cuda", 0)
