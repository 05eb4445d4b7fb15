import json

import pytest

from cifar10_resnet50 import config as C
from cifar10_resnet50.errors import UserError


def test_auto_fields_resolve_per_device():
    gpu = C.resolve(C.Config(), "cuda")
    cpu = C.resolve(C.Config(), "cpu")
    assert (gpu.model.image_size, gpu.train.epochs) == (160, 10)
    assert (cpu.model.image_size, cpu.train.epochs) == (64, 2)
    assert cpu.optim.lr == 0.1 and gpu.optim.weight_decay == 5e-4  # GPU lr: see below
    adamw = C.resolve(C.override(C.Config(), {"optim.optimizer": "adamw"}), "cpu")
    assert adamw.optim.lr == 1e-3 and adamw.optim.weight_decay == 0.05


def test_explicit_values_survive_resolution():
    cfg = C.override(C.Config(), {"model.image_size": 96, "train.epochs": 3, "optim.lr": 0.02})
    r = C.resolve(cfg, "cuda")
    assert (r.model.image_size, r.train.epochs, r.optim.lr) == (96, 3, 0.02)


def test_file_then_flags_override_defaults(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[optim]\nlr = 0.05\n[train]\nstrategy = "linear"\nepochs = 4\n')
    cfg = C.override(C.load_file(f), {"train.epochs": 7})
    assert cfg.optim.lr == 0.05
    assert cfg.train.strategy == "linear"
    assert cfg.train.epochs == 7  # the flag wins over the file
    assert cfg.train.batch_size == C.TrainConfig().batch_size  # untouched default


def test_saved_json_config_round_trips(tmp_path):
    cfg = C.resolve(C.override(C.Config(), {"augment.mixup": 0.2}), "cpu")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert C.load_file(path) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optim": {"lrr": 1}}, "unknown key optim.lrr"),
        ({"optimizer": {}}, "unknown section"),
        ({"train": {"epochs": "ten"}}, "whole number"),
        ({"train": {"strategy": "half"}}, "--strategy"),
        ({"train": {"progress": 1}}, "true or false"),
        ({"data": {"val_size": -1}}, "--val-size"),
        ({"train": {"seed": -1}}, "--seed"),
    ],
)
def test_bad_config_values_are_user_errors(data, message):
    with pytest.raises(UserError, match=message):
        C.from_dict(data)


def test_bad_config_file_syntax(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optim\nlr=")
    with pytest.raises(UserError, match="not valid"):
        C.load_file(f)
    with pytest.raises(UserError, match="not found"):
        C.load_file(tmp_path / "missing.toml")


def test_config_is_frozen():
    cfg = C.Config()
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_gradual_needs_an_epoch_left_to_unfreeze():
    gradual = {"train.strategy": "gradual", "train.freeze_epochs": 2}
    with pytest.raises(UserError, match="--freeze-epochs 2 leaves no epoch"):
        C.resolve(C.override(C.Config(), gradual), "cpu")  # CPU default: 2 epochs
    ok = C.resolve(C.override(C.Config(), {**gradual, "train.epochs": 3}), "cpu")
    assert ok.train.freeze_epochs == 2 and ok.train.epochs == 3


def test_readme_flags_table_is_generated_from_the_declarations():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- flags:start -->\n")[1].split("\n<!-- flags:end -->")[0]
    from cifar10_resnet50.declare import markdown_table

    assert table == markdown_table(C.train_flags()), "regenerate it: scripts/readme_flags.py"


def test_every_setting_with_a_flag_reaches_the_cli_with_its_declared_help():
    from cifar10_resnet50 import cli

    parser = cli.build_parser()
    train = cli._SUBPARSERS["train"]
    by_dest = {a.dest: a for a in train._actions}
    for flag, key, kwargs in C.train_flags():
        assert by_dest[key].option_strings == [flag] and by_dest[key].help == kwargs["help"]
    assert parser is not None


def test_gpu_defaults_use_big_batches_with_the_lr_scaled_to_the_global_batch():
    gpu, cpu = C.resolve(C.Config(), "cuda"), C.resolve(C.Config(), "cpu")
    assert (gpu.train.batch_size, gpu.optim.lr, gpu.train.eval_batch_size) == (512, 0.4, 1024)
    assert (cpu.train.batch_size, cpu.optim.lr, cpu.train.eval_batch_size) == (128, 0.1, 500)
    two = C.resolve(C.Config(), "cuda", world_size=2)  # global batch 1024: linear for SGD
    assert two.optim.lr == pytest.approx(0.8)
    adamw = C.override(C.Config(), {"optim.optimizer": "adamw"})
    assert C.resolve(adamw, "cuda").optim.lr == pytest.approx(1e-3 * 2)  # sqrt(512 / 128)
    mine = C.override(C.Config(), {"optim.lr": 0.05, "train.batch_size": 64})
    assert (C.resolve(mine, "cuda").optim.lr, C.resolve(mine, "cuda").train.batch_size) == (
        0.05,
        64,
    )


def test_old_configs_with_a_boolean_compile_still_load():
    cfg = C.from_dict({"train": {"compile": True}})
    assert (
        cfg.train.compile == "on"
        and C.from_dict({"train": {"compile": False}}).train.compile == "off"
    )
