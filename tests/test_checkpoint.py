import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cifar10_resnet50 import checkpoint
from cifar10_resnet50 import model as M
from cifar10_resnet50.data.cifar10 import CLASSES as CIFAR10_CLASSES
from cifar10_resnet50.errors import UserError


def _payload(net):
    return {
        "model_meta": M.model_meta("none", 32, CIFAR10_CLASSES, 32),
        "model": net.state_dict(),
        "config": {"x": 1},
    }


def test_round_trip_with_weights_only_gives_the_same_model(tmp_path):
    net = M.build("none", 32, 10).eval()
    path = tmp_path / "m.pt"
    checkpoint.save(path, _payload(net))
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == checkpoint.FORMAT and raw["version"] == checkpoint.VERSION
    assert set(raw["versions"]) == {"torch", "torchvision", "cifar10_resnet50"}
    loaded, meta = checkpoint.load_model(path)
    assert meta["classes"][0] == "airplane" and meta["image_size"] == 32
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_non_finite_weights_are_never_written(tmp_path):
    net = M.build("none", 32, 10)
    with torch.no_grad():
        net.net.fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        checkpoint.save(tmp_path / "m.pt", _payload(net))
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    net = M.build("none", 32, 10)
    path = tmp_path / "last.pt"
    checkpoint.save(path, _payload(net))
    before = path.read_bytes()

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    with pytest.raises(OSError):
        checkpoint.save(path, _payload(net))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_killed_midway_never_leaves_a_corrupt_file(tmp_path):
    """SIGKILL a process that keeps rewriting ``last.pt``: what is left always loads."""
    path = tmp_path / "last.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from cifar10_resnet50 import checkpoint, model
        payload = {{"model_meta": model.model_meta("none", 32, [str(i) for i in range(10)], 32),
                   "model": {{"w": torch.randn(4_000_000)}}, "config": {{}}}}
        i = 0
        while True:
            payload["config"]["i"] = i
            checkpoint.save({str(path)!r}, payload)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # several saves (16 MB each) under way
    finally:
        proc.kill()
        proc.wait()
    blob = checkpoint.load(path)
    assert blob["config"]["i"] >= 0 and blob["model"]["w"].shape == (4_000_000,)


def _zip_that_is_not_torch(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a tensor")


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b""), "is not a checkpoint"),
        (lambda p: p.write_bytes(b"PK\x03\x04broken"), "is not a checkpoint"),
        (_zip_that_is_not_torch, "not a readable checkpoint"),
        (lambda p: p.mkdir(), "is a folder; pass the checkpoint file inside it"),
    ],
)
def test_unreadable_checkpoints_are_user_errors(tmp_path, write, message):
    path = tmp_path / "c.pt"
    write(path)
    with pytest.raises(UserError, match=message):
        checkpoint.load(path)


def test_a_run_folder_given_as_checkpoint_points_at_best(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(UserError, match=f"for example {tmp_path / 'best.pt'}"):
        checkpoint.load(tmp_path)


def test_foreign_and_future_checkpoints_are_rejected(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match="not a cifar10-resnet50 checkpoint"):
        checkpoint.load(path)
    torch.save({"format": checkpoint.FORMAT, "version": 99}, path)
    with pytest.raises(UserError, match="version 99"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


class _Optimization:
    """What ``Saver`` needs of ``core.Optimization``: ``state_dict()`` by name."""

    def __init__(self, net):
        self.optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": {}, "scaler": {}}


def _saver(tmp_path):
    meta = M.model_meta("none", 32, CIFAR10_CLASSES, 32)
    return checkpoint.Saver(tmp_path, meta, {"x": 1}, is_main=True, world_size=1)


def test_saving_writes_on_a_thread_a_snapshot_that_training_cannot_change(tmp_path, monkeypatch):
    """An epoch's end hands last.pt and best.pt to a writer thread and goes on training; what
    lands on disk is the state at the save, not what training made of it since."""
    import threading

    net = M.build("none", 32, 10)
    opt = _Optimization(net)
    net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).sum().backward()
    opt.optimizer.step()  # a momentum buffer, which training keeps changing in place
    saved_fc = net.net.fc.weight.detach().clone()
    saved_momentum = opt.optimizer.state[net.net.fc.weight]["momentum_buffer"].clone()
    release, real_save = threading.Event(), checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a: (release.wait(30), real_save(*a)))
    saver = _saver(tmp_path)
    saver.save_last(net, opt, checkpoint.RunState(epoch=1, step=4), best_row={"epoch": 1})
    assert not saver.last.exists()  # the call returned while the write is held back
    with torch.no_grad():  # the next steps change the weights and the momentum in place
        net.net.fc.weight.add_(1.0)
        opt.optimizer.state[net.net.fc.weight]["momentum_buffer"].add_(1.0)
    release.set()
    saver.wait()
    last = checkpoint.load(saver.last)
    assert torch.equal(last["model"]["net.fc.weight"], saved_fc)
    momentum = last["train_state"]["optimizer"]["state"]
    assert any(torch.equal(s["momentum_buffer"], saved_momentum) for s in momentum.values())
    assert last["train_state"]["step"] == 4 and set(last["train_state"]["rng"]) == {"torch"}
    best = checkpoint.load(saver.best)
    assert torch.equal(best["model"]["net.fc.weight"], saved_fc) and best["metrics"]["epoch"] == 1


def test_a_failed_background_write_is_raised_by_the_next_wait(tmp_path, monkeypatch):
    net = M.build("none", 32, 10)
    saver = _saver(tmp_path)

    def full_disk(path, payload):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save", full_disk)
    saver.save_last(net, _Optimization(net), checkpoint.RunState())
    with pytest.raises(OSError, match="No space left"):
        saver.wait()
    saver.wait()  # raised once, then clear


def test_resume_ignores_cuda_generator_states_saved_by_more_gpus(tmp_path, monkeypatch):
    """Older last.pt files hold one CUDA generator state per visible GPU; restoring them failed
    with fewer GPUs. Training draws no random numbers from them, so they are not used."""
    net = M.build("none", 32, 10)
    opt = _Optimization(net)
    saver = _saver(tmp_path)
    saver.save_last(net, opt, checkpoint.RunState(epoch=2, batch=3, step=7))
    saver.wait()
    saved = checkpoint.load(saver.last)
    saved["train_state"]["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # 8 GPUs then
    refuse = lambda *a: pytest.fail("a CUDA generator state was restored")  # noqa: E731
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state", refuse)

    class _Restorable(_Optimization):
        def load_state_dict(self, states):
            self.optimizer.load_state_dict(states["optimizer"])

    state = saver.restore(saved, M.build("none", 32, 10), _Restorable(net))
    assert (state.epoch, state.batch, state.step) == (2, 3, 7)
