"""The step-wise API (issue 21, fastai's Learner): fit, unfreeze, fit again, evaluate, save;
the one-shot train command runs on the same object."""

from __future__ import annotations

import torch

from cifar10_resnet50 import api, checkpoint
from cifar10_resnet50.training.learner import Learner
from test_train import tiny


def test_fit_frozen_then_unfrozen_with_a_schedule_per_call_then_evaluate_and_save(
    synthetic_root, tmp_path
):
    cfg = tiny(synthetic_root, tmp_path / "run")
    learn = api.learner(cfg, out=tmp_path / "run")
    start = {k: v.clone() for k, v in learn.t.model.state_dict().items()}
    learn.freeze()
    learn.fit(1, lr=0.05)
    after_frozen = {k: v.clone() for k, v in learn.t.model.state_dict().items()}
    moved = [k for k in start if not torch.equal(start[k], after_frozen[k])]
    assert moved and all(k.startswith("net.fc.") for k in moved)  # the head alone, BN kept
    assert learn.t.opt.lr < 0.05 * 0.01  # its own schedule, decayed to its end
    learn.unfreeze()
    learn.fit(2, lr=0.02)
    assert not torch.equal(
        after_frozen["net.conv1.weight"], learn.t.model.state_dict()["net.conv1.weight"]
    )
    rows = learn.history
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["frozen_backbone"] for r in rows] == [True, False, False]
    assert rows[1]["lr"] > rows[0]["lr"]  # the second fit warmed up again at its own peak
    assert learn.state.step == 12 and (tmp_path / "run" / "best.pt").exists()

    report = learn.evaluate(test_images=100)
    assert report.metrics["count"] == 100
    saved = learn.save(tmp_path / "model.pt")
    model, meta = checkpoint.load_model(saved)
    assert meta["arch"] == "resnet50"
    assert all(torch.equal(v, learn.t.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert api.load(saved).predict(torch.zeros(1, 32, 32, 3, dtype=torch.uint8).numpy())


def test_the_train_command_runs_its_epochs_through_a_learner(synthetic_root, tmp_path):
    from cifar10_resnet50.training import train

    seen = []

    class Spy(Learner):
        def fit(self, *args, **kwargs):
            seen.append(self)
            return super().fit(*args, **kwargs)

    import cifar10_resnet50.training.train as train_module

    original = train_module.Learner
    train_module.Learner = Spy
    try:
        result = train.run(tiny(synthetic_root, tmp_path / "run"), final_eval=False)
    finally:
        train_module.Learner = original
    assert len(seen) == 1 and seen[0].state.epoch == result.epochs_done == 2
