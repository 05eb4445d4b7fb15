"""``--budget``: time real steps of this run, plan it (``budget``'s arithmetic), keep to the
plan while it runs, and report planned against actual.

Planning times the run's own steps — :func:`core.train_step` on its own augmented batches
(``trainer.batches``: mixup/CutMix included), one warm-up step, then up to 8 timed ones,
undone afterwards (:func:`core.undone`) — an evaluation batch and a checkpoint save. It may
use 10 % of the budget (``budget.planning_allowance``); past it, larger sizes are estimated
by pixel count instead of timed. The plan goes into the run's settings (``epochs``,
``steps_per_epoch``, ``image_size``; ``budget`` cleared) as if given as flags, and into
``plan.json``, so ``--resume`` and the schedule follow it. After each epoch
:func:`keep_to_budget` drops the epochs that would overrun at the speed just measured.

Every quantity a planning branch depends on is averaged over the ranks first
(``Trainer.mean_over_ranks``), so no rank skips a collective another runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import RunState
from ..config import parse_duration, step_batch
from ..data import augment
from ..errors import UserError
from ..fileio import save_torch, write_json
from . import budget, core
from .compile_policy import COMPILE_COST_S, graphs
from .trainer import Trainer, compile_policy, model_meta, run_work

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(t: Trainer, size: int, frozen: bool, deadline: float, timed: int = 8) -> float:
    """Seconds per optimizer step at ``size`` px: the run's own steps, timed after one
    warm-up step, then undone. As many timed steps as the warm-up step's time says fit
    before ``deadline`` (at least 1, at most ``timed``), the same number on every rank."""
    forward = t.prepare(frozen, eager=True)  # timing never compiles, whatever --compile says
    batches = t.batches.endless()
    with core.undone(t.model, t.opt), core.at_size(t.model, size):
        xb, target = next(batches)
        t0 = t.clock()
        core.train_step(forward, t.model, t.opt, t.recipe, xb, target)  # a new shape's set-up
        _sync(t.device)
        warm = max(t.clock() - t0, 1e-6)
        n = int(min(timed, max(1, t.mean_over_ranks((deadline - t.clock()) / warm))))
        t0 = t.clock()
        for xb, target in itertools.islice(batches, n):
            core.train_step(forward, t.model, t.opt, t.recipe, xb, target)
        _sync(t.device)
        seconds = (t.clock() - t0) / n
    return t.mean_over_ranks(seconds)


def time_eval(
    t: Trainer, size: int, deadline: float, min_seconds: float = 1.0, max_batches: int = 8
) -> float:
    """Seconds per evaluated image at ``size`` px: evaluation batches timed after one of the
    same shape (a first batch of a new shape pays the kernels' set-up on a CPU), for at least
    ``min_seconds`` or ``max_batches`` batches (2 at least), or until ``deadline`` (1 at
    least). No collectives inside: ranks may time different counts."""
    bs = t.cfg.train.eval_batch_size
    images = t.split.arrays.test_x
    with core.at_size(t.model, size):
        t.logits(images[:bs])
        t0, n = t.clock(), 0
        for start in range(bs, min(len(images), bs * (max_batches + 1)), bs):
            t.logits(images[start : start + bs])
            n += len(images[start : start + bs])
            now = t.clock()
            if (n >= 2 * bs and now - t0 >= min_seconds) or now >= deadline:
                break
    return t.mean_over_ranks((t.clock() - t0) / max(1, n))


def time_save(t: Trainer) -> float:
    """An epoch's checkpoints, timed for real: last.pt (weights + the optimizer's state: SGD
    one copy more, AdamW two) and best.pt (the weights), written atomically with fsync, each
    once into a throwaway file. They are written on a thread while the next epoch trains, but
    on a CPU that thread takes cores from training, so the whole write is counted (~1 s per
    epoch on 2 cores: small against real epochs, not against a 30-second budget's)."""
    seconds = 0.0
    if t.process.is_main:
        state = t.model.state_dict()
        copies = 2 if t.cfg.optim.optimizer == "sgd" else 3
        probe = t.out / ".budget-timing.pt"
        t0 = t.clock()
        save_torch({f"copy{i}": state for i in range(copies)}, probe)  # last.pt's size
        t1 = t.clock()
        save_torch({"model": state}, probe)  # best.pt's, written in about half the epochs
        seconds = (t1 - t0) + (t.clock() - t1) / 2
        probe.unlink(missing_ok=True)
    return t.mean_over_ranks(seconds)


def _fits(t: Trainer, seconds: float, deadline: float) -> bool:
    """Whether timing that takes ~``seconds`` still fits before ``deadline``. Agreed, so every
    rank takes the same branch (timing steps hold collectives)."""
    return seconds <= t.mean_over_ranks(deadline - t.clock())


def step_timer(t: Trainer, deadline: float) -> Callable[[int, bool], float]:
    """Seconds per step at (size, frozen), measured once each. Planning may use the time up
    to ``deadline`` (a share of the budget): past it, a larger size's time is estimated from
    the largest one measured (:func:`budget.scaled`) instead of timed, so planning never
    eats the budget, whatever the data or batch size (a 2-minute budget on a 162-image
    folder once spent 6 minutes timing five sizes, then refused)."""
    steps: dict[tuple[int, bool], float] = {}

    def step_s(size: int, frozen: bool) -> float:
        if (size, frozen) not in steps:
            known = [s for s, f in steps if f == frozen]
            guess = known and budget.scaled(steps[(max(known), frozen)], max(known), size)
            if guess and not _fits(t, 3 * guess, deadline):  # warm-up + 2 timed steps
                log.info("budget: the %d px step time is estimated from %d px", size, max(known))
                steps[(size, frozen)] = guess
            else:
                steps[(size, frozen)] = time_steps(t, size, frozen, deadline)
        return steps[(size, frozen)]

    return step_s


def eval_timer(t: Trainer, deadline: float) -> Callable[[int], float]:
    """Seconds per evaluated image at a size, measured once each (estimated past
    ``deadline``, as :func:`step_timer`)."""
    evals: dict[int, float] = {}

    def eval_s(size: int) -> float:
        if size not in evals:
            guess = evals and budget.scaled(evals[max(evals)], max(evals), size)
            batches = 3 * t.cfg.train.eval_batch_size  # warm-up + 2 timed batches
            fits = not guess or _fits(t, guess * batches, deadline)
            evals[size] = time_eval(t, size, deadline) if fits else guess
        return evals[size]

    return eval_s


# --------------------------------------------------------------------------- planning


def plan_budget(t: Trainer, auto_size: bool, final_eval: bool) -> None:
    """Time real steps, plan epochs × steps (and the resolution when it is auto), and set the
    run to the plan: its settings (config.json, as if those flags had been given), schedule,
    resolution and checkpoints' metadata; the plan itself goes to plan.json."""
    tc = t.cfg.train
    budget_s = parse_duration(tc.budget)
    shape = budget.Shape(
        full_steps=augment.steps_per_epoch(
            len(t.split.train_idx), step_batch(tc), t.process.world_size
        ),
        global_batch=step_batch(tc) * t.process.world_size,
        val_images=len(t.split.val_x),
        test_images=min(len(t.split.arrays.test_x), tc.test_images or 10**9) if final_eval else 0,
        strategy=tc.strategy,
        freeze_epochs=tc.freeze_epochs,
        progressive=tc.progressive,
        calibration_images=len(t.split.val_idx),
    )
    sizes = budget.LADDER[t.device.type] if auto_size else (t.cfg.model.image_size,)
    allowance = budget.planning_allowance(budget_s)
    log.info("budget %s: timing real steps to plan the run (≤ ~%.0f s)", tc.budget, allowance)
    deadline = t.clock() + allowance
    timings = budget.Timings(step_timer(t, deadline), eval_timer(t, deadline), time_save(t))

    def elapsed() -> float:
        return t.mean_over_ranks(t.clock() - t.started)

    first = None
    with contextlib.suppress(UserError):  # (the error, if any, comes next with the right set-up)
        first = budget.plan(budget_s, elapsed(), shape, timings, sizes)  # times what it needs
    # Again with the timing steps' own time counted: the timings are measured by now; and
    # with --compile on, one compile per graph of the first plan's epochs.
    compiling = _compile_s(t, first) if tc.compile == "on" and first else 0.0
    plan = budget.plan(budget_s, elapsed() + compiling, shape, timings, sizes)
    if tc.strategy == "gradual" and plan.epochs <= tc.freeze_epochs:
        raise UserError(
            f"--budget {tc.budget} leaves {plan.epochs} epoch(s), not one more than "
            f"--freeze-epochs {tc.freeze_epochs}; raise the budget or lower --freeze-epochs"
        )
    log.info("%s", plan.describe())
    # `--compile auto` stays eager: whether a compile repays its cost is known only after
    # timing eager steps, too late for a plan that already counts every second.
    _apply(t, plan.image_size, {"budget": tc.budget, **dataclasses.asdict(plan), "eta_s": plan.eta_s},
           epochs=plan.epochs, steps_per_epoch=plan.steps_per_epoch,
           compile="off" if tc.compile == "auto" else tc.compile)  # fmt: skip
    t.opt.rescheduled(t.cfg.optim, plan.epochs * plan.steps_per_epoch)
    t.batches = dataclasses.replace(t.batches, steps=plan.steps_per_epoch)
    t.plan = plan


def _compile_s(t: Trainer, plan: budget.Plan) -> float:
    """``--compile on`` under ``--budget``: one compile per graph the planned epochs need."""
    planned = dataclasses.replace(
        t.cfg,
        model=dataclasses.replace(t.cfg.model, image_size=plan.image_size),
        train=dataclasses.replace(t.cfg.train, epochs=plan.epochs),
    )
    n = graphs(run_work(planned, plan.steps_per_epoch))
    log.info(
        "budget: --compile on, %d graph(s) at ~%.0f s each counted",
        n,
        COMPILE_COST_S[t.device.type],
    )
    return n * COMPILE_COST_S[t.device.type]


def plan_probe_budget(t: Trainer, auto_size: bool) -> None:
    """``--strategy linear`` has no epochs to plan: the budget picks the resolution (the
    largest whose feature pass fits), or says in one line that none does."""
    tc = t.cfg.train
    budget_s = parse_duration(tc.budget)
    s = t.split
    feature_images = (len(s.train_idx) + len(s.val_idx)) * (2 if tc.probe_mirrors else 1)
    sizes = budget.LADDER[t.device.type] if auto_size else (t.cfg.model.image_size,)
    eval_s = eval_timer(t, t.clock() + budget.planning_allowance(budget_s))
    size, estimate = budget.plan_probe(
        budget_s,
        lambda: t.mean_over_ranks(t.clock() - t.started),
        feature_images,
        len(s.arrays.test_x) + len(s.val_idx),  # + the temperature's validation pass
        eval_s,
        sizes,
        budget.PROBE_FIT_S[t.device.type],
    )
    log.info(
        "budget %s: linear probe at %d px, ~%s", tc.budget, size, budget.format_duration(estimate)
    )
    _apply(t, size, {"budget": tc.budget, "image_size": size, "eta_s": estimate})


def _apply(t: Trainer, image_size: int, plan: dict[str, Any], **train_changes: Any) -> None:
    """The planned settings into the run's config (config.json, as if given as flags, so
    --resume follows the plan), the model's resolution and the checkpoints' metadata; the
    plan itself into plan.json."""
    cfg = dataclasses.replace(
        t.cfg,
        model=dataclasses.replace(t.cfg.model, image_size=image_size),
        train=dataclasses.replace(t.cfg.train, budget=None, **train_changes),
    )
    t.model.preprocess.image_size = image_size
    t.meta = t.saver.meta = model_meta(cfg, t.split.arrays)
    t.compile = compile_policy(cfg, t.device.type, cfg.train.steps_per_epoch or t.steps_per_epoch)
    t.set_config(cfg)
    if t.process.is_main:
        write_json(t.out / "plan.json", plan)


# --------------------------------------------------------------------------- while it runs


def keep_to_budget(t: Trainer, state: RunState, epoch_s: float) -> None:
    """``--budget`` on a machine slower than when it was planned (a busy CPU, a throttled
    card): after each epoch, if the epochs left — at the last epoch's measured speed — and
    the final evaluation would overrun the budget, drop the epochs that do not fit. The
    schedule is re-planned for the new total (cosine to 0 at the new end) and config.json
    and plan.json say so, so --resume follows. A run therefore ends within the budget plus
    at most one epoch (the one during which it slowed down). Never adds epochs."""
    p, epochs = t.plan, t.cfg.train.epochs
    if p is None or state.epoch >= epochs:
        return
    epoch_s = t.mean_over_ranks(epoch_s)
    slower = max(1.0, epoch_s / p.epoch_s[state.epoch - 1])
    left = p.budget_s - t.mean_over_ranks(t.clock() - t.started) - p.final_s * slower
    keep = budget.epochs_that_fit(left, p.epoch_s[state.epoch : epochs], slower)
    if keep >= epochs - state.epoch:
        return
    new = state.epoch + keep
    log.warning(
        "budget %s: epoch %d took %s, %.1f× its plan; %d epochs instead of %d, to end in time",
        budget.format_duration(p.budget_s), state.epoch, budget.format_duration(epoch_s),
        slower, new, epochs,
    )  # fmt: skip
    record = {"after_epoch": state.epoch, "epochs": new, "epoch_s": round(epoch_s, 2)}
    t.opt.rescheduled(t.cfg.optim, new * t.steps_per_epoch)
    t.set_config(dataclasses.replace(t.cfg, train=dataclasses.replace(t.cfg.train, epochs=new)))
    if t.process.is_main:
        _update_plan_file(t.out, lambda rec: rec.setdefault("replans", []).append(record))


def _update_plan_file(out: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = out / "plan.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    change(record)
    write_json(path, record)


def report(t: Trainer) -> None:
    """Planned against actual, in the log and in plan.json (``actual_s``)."""
    if t.plan is None:
        return
    actual = t.clock() - t.started
    log.info(
        "budget %s: planned to end at ~%s, ended at %s (%+.0f%% of the budget)",
        budget.format_duration(t.plan.budget_s), budget.format_duration(t.plan.eta_s),
        budget.format_duration(actual), 100 * (actual / t.plan.budget_s - 1),
    )  # fmt: skip
    if t.process.is_main:
        _update_plan_file(t.out, lambda rec: rec.update(actual_s=round(actual, 2)))


def eta(t: Trainer, step: int) -> dict[str, str]:
    """The progress bar's "eta" against the budget: the plan's end, moved by how far the run
    is ahead of or behind the plan at this step."""
    if t.plan is None:
        return {}
    p = t.plan
    expected = p.elapsed_s + p.train_s * step / (p.epochs * p.steps_per_epoch)
    end = p.eta_s + (t.clock() - t.started) - expected
    return {"eta": f"{budget.format_duration(end)}/{budget.format_duration(p.budget_s)}"}
