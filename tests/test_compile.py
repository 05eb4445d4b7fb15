"""``--compile``: the decision counts the graphs a run needs (sizes × backbone states)."""

from __future__ import annotations

import logging

import torch

from cifar10_resnet50 import config as C
from cifar10_resnet50.training import compile_policy as P
from cifar10_resnet50.training.trainer import run_work

# H100 figures (issue 6): 512 images in 0.069 s eager at 160 px; 88 steps an epoch.
STEP_S, STEPS = 0.069, 88


def _cfg(**changes):
    base = {"model.image_size": 160, "train.epochs": 10}
    return C.override(C.Config(), {**base, **changes})


def test_auto_pays_only_for_long_runs_of_one_graph():
    short = run_work(_cfg(), STEPS)  # 880 steps save ~18 s < 65 s of compiling
    assert P.graphs(short) == 1 and not P.compile_pays("cuda", STEP_S, 160, short)
    long = run_work(_cfg(**{"train.epochs": 60}), STEPS)  # 5,280 steps save ~110 s
    assert P.compile_pays("cuda", STEP_S, 160, long)
    assert not P.compile_pays("cpu", 0.5, 160, long)  # no measured gain on CPUs


def test_progressive_runs_count_a_graph_per_size_and_the_larger_sizes_time():
    work = run_work(_cfg(**{"train.epochs": 60, "train.progressive": True}), STEPS)
    sizes = {w.size for w in work}
    assert P.graphs(work) == len(sizes) > P.RECOMPILE_LIMIT  # 80→160 px in 8 px steps
    # Timed at the first epoch's 80 px: the later, larger epochs cost up to 4× as much eager.
    # One compile would pay; one per size (~11 × 65 s) does not.
    one_graph = [P.Work(160, False, sum(w.steps for w in work))]
    assert P.compile_pays("cuda", STEP_S / 4, 80, one_graph)
    assert not P.compile_pays("cuda", STEP_S / 4, 80, work)


def test_gradual_runs_count_the_frozen_and_unfrozen_graphs():
    work = run_work(_cfg(**{"train.strategy": "gradual", "train.freeze_epochs": 2}), STEPS)
    assert [w.frozen for w in work] == [True] * 2 + [False] * 8 and P.graphs(work) == 2
    # Resumed in epoch 3: only the unfrozen graph is left, and the first epoch's steps done.
    left = run_work(_cfg(**{"train.strategy": "gradual", "train.freeze_epochs": 2}), STEPS, 2, 50)
    assert P.graphs(left) == 1 and sum(w.steps for w in left) == 8 * STEPS - 50


def test_auto_stays_eager_under_sync_bn_and_on_warns(caplog):
    work = run_work(_cfg(**{"train.epochs": 600}), STEPS)  # long enough to pay otherwise
    policy = P.CompilePolicy.from_setting("auto", "cuda", work, sync_bn=True)
    assert not policy.compiled and not policy.deciding
    with caplog.at_level(logging.WARNING, logger="cifar10_resnet50"):
        assert P.CompilePolicy.from_setting("on", "cuda", work, sync_bn=True).compiled
    assert "SyncBatchNorm layer breaks the graph" in caplog.text


def test_on_raises_the_recompile_limit_to_the_graphs_the_run_needs():
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    work = run_work(_cfg(**{"train.epochs": 60, "train.progressive": True}), STEPS)
    with config.patch(**{name: 8}):  # restored afterwards
        P.CompilePolicy.from_setting("on", "cuda", work)
        assert getattr(config, name) == P.graphs(work) > 8


def test_auto_decides_once_after_timing_and_every_rank_follows_rank_0():
    work = run_work(_cfg(**{"train.epochs": 60}), STEPS)
    policy = P.CompilePolicy.from_setting("auto", "cuda", work)
    policy.at_sync(0.0, 10, 160, lambda: work, lambda d: d)  # the window's start: not timed
    policy.at_sync(0.5, 20, 160, lambda: work, lambda d: d)  # 10 steps: too few to decide
    assert policy.deciding
    asked = []
    policy.at_sync(20 * STEP_S, 30, 160, lambda: work, lambda d: asked.append(d) or False)
    assert asked == [True] and not policy.deciding and not policy.compiled  # rank 0 said no


def test_budget_timing_never_runs_compiled_steps(synthetic_root, tmp_path, monkeypatch, caplog):
    """--budget times eager steps even with --compile on (a compile inside the timing would
    eat the budget), and the plan counts one compile per graph; training then runs compiled."""
    from cifar10_resnet50.training import train

    calls = []

    class Counted(torch.nn.Module):  # stands in for the compiled module (no real compile)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            calls.append(x.shape[0])
            return self.module(x)

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Counted(module))
    cfg = C.override(
        C.Config(),
        {"data.data_dir": str(synthetic_root), "data.download": False, "data.subset": 64,
         "data.val_size": 20, "model.weights": "none", "model.image_size": 32,
         "train.batch_size": 16, "train.device": "cpu", "train.out": str(tmp_path / "r"),
         "train.progress": False, "train.tensorboard": False, "train.compile": "on",
         "train.budget": "2h", "train.epochs": None},
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="cifar10_resnet50")
    train.run(cfg, final_eval=False, stop_after_steps=3)
    assert len(calls) == 3  # the three training steps, none of the timing steps
    assert "budget: --compile on, 1 graph(s) at ~76 s each counted" in caplog.text
