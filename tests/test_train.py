import json
import math
import shutil

import pytest
import torch

from cifar10_resnet50 import checkpoint
from cifar10_resnet50 import config as C
from cifar10_resnet50 import model as M
from cifar10_resnet50.errors import UserError
from cifar10_resnet50.training import core, train
from cifar10_resnet50.training.callbacks import Callback


def tiny(root, out, **changes):
    """A run of a few seconds: 64 images, 32 px, batches of 16 → 4 steps per epoch."""
    settings = {
        "data.data_dir": str(root),
        "data.download": False,
        "data.val_size": 20,
        "data.subset": 64,
        "model.weights": "none",
        "model.image_size": 32,
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.device": "cpu",
        "train.out": str(out),
        "train.progress": False,
        "train.eval_batch_size": 50,
        # The test report on 200 of the 10,000 test images: a full pass is ~30 s on one core.
        "train.test_images": 200,
        # TensorBoard's figures cost ~1 s here (at the last epoch); its events are tested on
        # the API's run (test_notebook), so these runs go without.
        "train.tensorboard": False,
    }
    settings.update(changes)
    return C.override(C.Config(), settings)


def _state(path):
    return checkpoint.load(path)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "changes, stop_after",
    [
        ({}, 5),  # mid-epoch 2
        ({}, 4),  # exactly at the end of epoch 1, before its validation
        ({"train.strategy": "gradual", "augment.mixup": 0.5, "augment.cutmix": 1.0}, 6),
        ({"train.ema": 0.9}, 5),  # the weight EMA (validated, best.pt) resumes too
        ({"augment.policy": "trivial", "augment.resized_crop": 0.35}, 6),
        # epoch 1 at 32 px, stopped in epoch 2 at 64 px
        ({"train.progressive": True, "model.image_size": 64}, 5),
        ({"train.progressive": True, "model.image_size": 64, "train.steps_per_epoch": 3}, 4),
    ],
)
def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(
    synthetic_root, tmp_path, changes, stop_after
):
    full = train.run(tiny(synthetic_root, tmp_path / "a", **changes), final_eval=False)
    cfg_b = tiny(synthetic_root, tmp_path / "b", **changes)
    part = train.run(cfg_b, final_eval=False, stop_after_steps=stop_after)
    assert part.stopped_early
    assert _state(part.last)["train_state"]["step"] == stop_after
    resumed = train.run(cfg_b, resume=True, final_eval=False)
    assert not resumed.stopped_early and resumed.epochs_done == 2

    a, b = _state(full.last), _state(resumed.last)
    _assert_same_weights(a["model"], b["model"])
    if "ema" in a["train_state"]:
        assert a["train_state"]["ema"]["updates"] == b["train_state"]["ema"]["updates"] == 8
        _assert_same_weights(a["train_state"]["ema"]["weights"], b["train_state"]["ema"]["weights"])
    for sa, sb in zip(
        a["train_state"]["optimizer"]["state"].values(),
        b["train_state"]["optimizer"]["state"].values(),
        strict=True,
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    rows = [
        [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
        for p in (tmp_path / "a", tmp_path / "b")
    ]
    for ra, rb in zip(*rows, strict=True):
        for key in ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert ra[key] == rb[key], key


def test_run_folder_holds_config_metrics_curves_and_checkpoints(synthetic_root, tmp_path):
    result = train.run(
        tiny(synthetic_root, tmp_path / "r", **{"data.subset": 32}), final_eval=False
    )
    out = tmp_path / "r"
    saved = json.loads((out / "config.json").read_text())
    # resolved: 32 px, and the lr scaled linearly from 0.1 at batch 128 to batch 16
    assert saved["model"]["image_size"] == 32 and saved["optim"]["lr"] == 0.1 * 16 / 128
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val_acc"] <= 1 and r["img_per_s"] > 0 for r in rows)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = _state(result.best)
    assert best["metrics"]["val_acc"] == max(r["val_acc"] for r in rows)
    assert best["metrics"] == max(rows, key=lambda r: r["val_acc"])
    assert "train_state" not in best  # model only: small, and not something to resume from
    assert _state(result.last)["train_state"]["best_val_acc"] == best["metrics"]["val_acc"]
    assert best["config"] == saved and best["model_meta"]["weights"].startswith("none")


def test_each_epoch_records_where_its_time_went_and_the_run_its_whole_img_per_s(
    synthetic_root, tmp_path, caplog
):
    """metrics.jsonl splits each epoch's seconds into train / validate / save / other, so
    time outside the training loop shows; the log gives the whole run's img/s beside the
    loop's. A callback that spends 0.3 s per epoch lands in "other"."""
    import time

    class Slow(Callback):
        def epoch_end(self, trainer, state, row, val_logits):
            time.sleep(0.3)

    caplog.set_level("INFO", logger="cifar10_resnet50")
    cfg = tiny(synthetic_root, tmp_path / "r", **{"data.subset": 32})
    train.run(cfg, final_eval=False, callbacks=[Slow()])
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    for row in rows:
        split = row["time"]
        assert set(split) == {"train", "validate", "save", "other"}
        assert split["train"] == pytest.approx(row["seconds"], abs=0.01)
        assert split["other"] >= 0.3 and split["validate"] > 0 and split["save"] > 0
        assert row["images"] == 32  # 2 steps of 16
    whole = [r.getMessage() for r in caplog.records if "over the whole run" in r.getMessage()]
    assert len(whole) == 1 and whole[0].startswith("2 epoch(s): "), whole


def test_existing_run_is_not_overwritten_without_resume(synthetic_root, tmp_path):
    cfg = tiny(synthetic_root, tmp_path / "r", **{"train.epochs": 1, "data.subset": 32})
    train.run(cfg, final_eval=False)
    with pytest.raises(UserError, match="already holds a run"):
        train.run(cfg, final_eval=False)


def test_resume_refuses_changed_settings_but_allows_more_epochs(synthetic_root, tmp_path):
    cfg = tiny(synthetic_root, tmp_path / "r", **{"train.epochs": 1, "data.subset": 32})
    train.run(cfg, final_eval=False)
    with pytest.raises(UserError, match="optim.lr"):
        train.run(C.override(cfg, {"optim.lr": 0.5}), resume=True, final_eval=False)
    longer = train.run(C.override(cfg, {"train.epochs": 2}), resume=True, final_eval=False)
    assert longer.epochs_done == 2
    with pytest.raises(UserError, match="no .*last.pt"):
        train.run(tiny(synthetic_root, tmp_path / "empty"), resume=True, final_eval=False)


def test_diverging_run_stops_naming_the_step_and_saves_nothing(synthetic_root, tmp_path):
    cfg = tiny(
        synthetic_root,
        tmp_path / "r",
        **{"optim.lr": 1e30, "optim.grad_clip": 0.0, "optim.warmup": 0.0},
    )
    with pytest.raises(
        UserError, match=r"loss became (nan|inf) at step \d+ \(epoch \d, batch \d\)"
    ):
        train.run(cfg, final_eval=False)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_linear_probe_trains_only_the_head_and_keeps_batchnorm_statistics(synthetic_root, tmp_path):
    cfg = tiny(synthetic_root, tmp_path / "r", **{"train.strategy": "linear", "train.epochs": 1})
    torch.manual_seed(cfg.train.seed)
    init = M.build("none", 32, 10, progress=False).state_dict()  # same seed → same initial weights
    result = train.run(cfg, final_eval=False)
    after = _state(result.last)["model"]
    for k, v in init.items():
        if k.startswith("net.fc."):
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k  # weights AND running statistics unchanged


def test_gradual_freezes_the_backbone_for_the_first_epochs(synthetic_root, tmp_path):
    cfg = tiny(
        synthetic_root, tmp_path / "r", **{"train.strategy": "gradual", "train.freeze_epochs": 1}
    )
    train.run(cfg, final_eval=False, stop_after_steps=4)  # end of epoch 1
    torch.manual_seed(cfg.train.seed)
    init = M.build("none", 32, 10, progress=False).state_dict()
    mid = _state(tmp_path / "r" / "last.pt")["model"]
    assert torch.equal(mid["net.layer1.0.conv1.weight"], init["net.layer1.0.conv1.weight"])
    assert not torch.equal(mid["net.fc.weight"], init["net.fc.weight"])
    done = _state(train.run(cfg, resume=True, final_eval=False).last)["model"]
    assert not torch.equal(done["net.layer1.0.conv1.weight"], init["net.layer1.0.conv1.weight"])


def test_param_groups_put_no_decay_on_norms_and_biases_and_scale_the_backbone_lr():
    net = M.build("none", 32, 10)
    groups = {g["name"]: g for g in core.param_groups(net, 0.1, 0.01, 5e-4)}
    assert groups["head"]["lr"] == 0.1 and groups["backbone"]["lr"] == 0.01
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    assert all(p.ndim == 4 for p in groups["backbone"]["params"])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in net.parameters())


def test_lr_schedules_warm_up_then_decay():
    cos = core.lr_factor("cosine", total_steps=100, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    one = core.lr_factor("onecycle", total_steps=100, warmup_steps=0)
    assert one(0) == pytest.approx(1 / 25) and one(25) == pytest.approx(1.0)
    assert one(100) == pytest.approx(1e-4)
    assert all(not math.isnan(one(s)) for s in range(101))


def test_from_scratch_trains_the_backbone_at_the_head_lr(synthetic_root, tmp_path):
    result = train.run(
        tiny(synthetic_root, tmp_path / "r", **{"train.epochs": 1, "data.subset": 32}),
        final_eval=False,
    )
    groups = _state(result.last)["train_state"]["optimizer"]["param_groups"]
    lrs = {g["name"]: g["initial_lr"] for g in groups}
    assert lrs["backbone"] == lrs["head"] == 0.1 * 16 / 128  # the default, scaled to batch 16


def test_progressive_resizing_trains_early_epochs_smaller_and_keeps_the_target_size(
    synthetic_root, tmp_path
):
    sizes = []

    class Spy(Callback):
        def step_end(self, trainer, state, out):
            sizes.append(trainer.model.preprocess.image_size)

    changes = {"train.progressive": True, "train.epochs": 4, "model.image_size": 64}
    cfg = tiny(synthetic_root, tmp_path / "r", **changes)
    result = train.run(cfg, final_eval=False, callbacks=[Spy()])
    assert sizes == [32] * 4 + [40] * 4 + [48] * 4 + [64] * 4  # progressive_sizes(64, 4)
    saved = _state(result.last)
    assert saved["model_meta"]["image_size"] == 64
    # One schedule across the resolutions: the lr decays smoothly to 0 over all 16 steps.
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0, abs=1e-12)


def test_steps_per_epoch_shortens_every_epoch_to_a_fresh_sample(synthetic_root, tmp_path):
    cfg = tiny(synthetic_root, tmp_path / "r", **{"train.steps_per_epoch": 2, "train.epochs": 3})
    result = train.run(cfg, final_eval=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert _state(result.last)["train_state"]["step"] == 6


def test_resume_from_a_new_shell_finds_the_data_of_a_run_started_with_the_variable(
    synthetic_root, tmp_path, monkeypatch
):
    """A run started with $CIFAR10_DATA_DIR (no --data-dir) resumes in a shell without it,
    and resuming with --data-dir naming another copy is accepted (before: three download
    attempts, then 'data.data_dir: None → …' refused as a changed setting)."""
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(synthetic_root))
    out = tmp_path / "r"
    train.run(tiny(None, out, **{"data.data_dir": None}), final_eval=False, stop_after_steps=2)
    assert json.loads((out / "config.json").read_text())["data"]["data_dir"] == str(synthetic_root)
    monkeypatch.delenv("CIFAR10_DATA_DIR")
    done = train.run(C.load_file(out / "config.json"), resume=True, final_eval=False)
    assert done.epochs_done == 2

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    again = tmp_path / "again"
    train.run(tiny(synthetic_root, again), final_eval=False, stop_after_steps=2)
    moved = C.override(C.load_file(again / "config.json"), {"data.data_dir": str(copy)})
    assert train.run(moved, resume=True, final_eval=False).epochs_done == 2


def test_a_subset_run_validates_on_a_tenth_of_its_subset(synthetic_root, tmp_path):
    cfg = tiny(synthetic_root, tmp_path / "r", **{"data.val_size": None, "data.subset": 200})
    train.run(cfg, final_eval=False, stop_after_steps=1)
    splits = json.loads((tmp_path / "r" / "splits.json").read_text())
    assert len(splits["val"]) == 20  # not 5,000 (a tenth of all the training images)


def test_patience_ends_the_run_when_validation_stops_improving_and_resume_keeps_it(
    synthetic_root, tmp_path
):
    # A learning rate too small to move the weights: validation accuracy soon stops rising.
    cfg = tiny(synthetic_root, tmp_path / "r", **{"train.epochs": 6, "train.patience": 1,
                                                 "optim.lr": 1e-7})  # fmt: skip
    result = train.run(cfg, final_eval=False)
    rows = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    accs = [json.loads(line)["val_acc"] for line in rows]
    best, best_epoch, expected = None, 0, 6
    for epoch, acc in enumerate(accs, 1):  # the rule, applied to the run's own figures
        if best is None or acc > best:
            best, best_epoch = acc, epoch
        if epoch - best_epoch >= 1:
            expected = epoch
            break
    assert result.epochs_done == len(accs) == expected < 6, accs
    assert checkpoint.load(result.best)["metrics"]["epoch"] == best_epoch
    again = train.run(cfg, resume=True, final_eval=False)
    assert again.already_finished and again.epochs_done == expected
    more = C.override(cfg, {"train.patience": 6, "train.epochs": expected + 1})
    longer = train.run(more, resume=True, final_eval=False)  # more patience: trains on
    assert not longer.already_finished and longer.epochs_done == expected + 1
    with pytest.raises(UserError, match="--patience watches validation accuracy"):
        C.validate(C.override(cfg, {"data.val_size": 0}))
