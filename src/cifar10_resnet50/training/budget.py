"""``train --budget 10m``: plan a run that finishes — training, validation and the final test
evaluation — within a wall-clock budget, and progressive resizing's per-epoch resolutions.

The arithmetic lives here, free of torch, so it is tested exactly; the timings it works from
are real steps that ``train`` runs (and undoes) before training (:class:`Timings`).

Plan, given the time left after set-up and the timing steps:

* The final test evaluation and its plots are reserved first.
* Each epoch costs ``S`` optimizer steps (their measured time at that epoch's resolution, and
  frozen or not) plus validation and the checkpoint saves.
* The run gets the fewest epochs ``E`` whose step count per epoch ``S`` (the same in every
  epoch) fits the time left without exceeding one pass over the data: so the budget is
  spent, not rounded down to whole epochs, and the warm-up and cosine schedule are planned
  for exactly ``E × S`` steps. With ``S`` below a full pass, each epoch is a fresh random
  sample of the training images (``--steps-per-epoch``, as Keras' ``steps_per_epoch``).
* With ``--image-size`` left to auto, resolutions from :data:`LADDER` are tried from the
  smallest up; the largest one that still gets :data:`MIN_EPOCHS` epochs wins (fewer passes
  than that at a higher resolution learned less in our from-scratch runs here, and
  fine-tuning recipes such as BiT's use many passes at a moderate resolution).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError

LADDER = {"cpu": (32, 48, 64, 96, 128), "cuda": (96, 128, 160, 192, 224)}
MIN_EPOCHS = 5
PROBE_FIT_S = {"cpu": 40.0, "cuda": 10.0}  # L-BFGS over the L2 grid on 95,000 features
# The test report's plots and curves.png (~1.7 s on this 2-core CPU) and TensorBoard's figures
# at the last epoch (~1 s).
FINAL_FIXED_S = 3.0
# Timing steps before training may take this share of the budget, or PLAN_MIN_S when that is
# more (a few real steps are needed whatever the budget); sizes past it are estimated.
PLAN_SHARE = 0.10
PLAN_MIN_S = 3.0


def planning_allowance(budget_s: float) -> float:
    """Seconds that timing steps may take before a run of ``budget_s``."""
    return max(PLAN_SHARE * budget_s, PLAN_MIN_S)


def scaled(seconds: float, measured_px: int, px: int) -> float:
    """A time measured at ``measured_px`` carried to ``px`` by the pixel count. A step's work
    grows with the pixels; on a GPU at small sizes time grows less than that, so this errs
    long, which plans a run that ends early rather than late."""
    return seconds * (px / measured_px) ** 2


def epochs_that_fit(left_s: float, planned_s: tuple[float, ...], slower: float) -> int:
    """How many of the epochs left (their planned seconds ``planned_s``) fit in ``left_s`` when
    each takes ``slower`` times its plan. Counted from the last ones: with progressive resizing
    or a frozen start, the last epochs are the dearest, and a shortened run ends with them."""
    total = 0.0
    for kept, seconds in enumerate(reversed(planned_s)):
        total += seconds * slower
        if total > left_s:
            return kept
    return len(planned_s)


def format_duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progressive_sizes(target: int, epochs: int) -> list[int]:
    """Per-epoch training resolutions for ``--progressive``: the last quarter of the epochs (at
    least one) at ``target``; before that a linear ramp from half of it (≥ 32 px), in 8 px steps
    (fastai's progressive resizing, FFCV's ramp; FixRes: the final resolution is the one that
    counts). Validation and the saved model always use ``target``."""
    final = max(1, epochs // 4)
    ramp = epochs - final
    # Not below 32 px: ResNet-50 downsamples 32×, so layer4 would see less than a pixel (a
    # from-scratch run at 16 px went NaN in its second step here).
    low = min(target, max(32, (target // 2) // 8 * 8))
    sizes = [max(low, int(low + (target - low) * e / ramp) // 8 * 8) for e in range(ramp)]
    return sizes + [target] * final


@dataclass(frozen=True)
class Timings:
    """What the planner needs, measured by ``train`` on real steps of the run being planned.

    ``step_s(size, frozen)``: seconds per optimizer step; ``eval_s(size)``: seconds per
    evaluated image; ``save_s``: seconds for an epoch's checkpoint save(s)."""

    step_s: Callable[[int, bool], float]
    eval_s: Callable[[int], float]
    save_s: float


@dataclass(frozen=True)
class Plan:
    epochs: int
    steps_per_epoch: int
    image_size: int
    sizes: tuple[int, ...]  # training resolution of each epoch
    images_per_s: float  # expected training throughput
    train_s: float  # epochs, with validation and saves
    final_s: float  # the test evaluation
    budget_s: float
    elapsed_s: float  # spent before training: set-up and the timing steps
    epoch_s: tuple[float, ...] = ()  # each epoch's planned seconds (steps, validation, saves)

    @property
    def eta_s(self) -> float:
        return self.elapsed_s + self.train_s + self.final_s

    def describe(self) -> str:
        sizes = sorted(set(self.sizes))
        px = f"{self.image_size} px" if len(sizes) == 1 else f"{sizes[0]}→{self.image_size} px"
        return (
            f"budget {format_duration(self.budget_s)}: {self.epochs} epochs × "
            f"{self.steps_per_epoch} steps at {px}, ~{self.images_per_s:.0f} img/s, training "
            f"{format_duration(self.train_s)} + test evaluation {format_duration(self.final_s)}"
            f" → ends in ~{format_duration(self.eta_s)} (set-up and timing took "
            f"{format_duration(self.elapsed_s)})"
        )


@dataclass(frozen=True)
class Shape:
    """The run being planned: what does not depend on the plan."""

    full_steps: int  # one pass over the training images
    global_batch: int
    val_images: int  # per process (validation is sharded)
    test_images: int  # 0 without a final evaluation
    strategy: str
    freeze_epochs: int
    progressive: bool
    calibration_images: int = 0  # the validation split, scored once more for temperature scaling


def _epoch_sizes(shape: Shape, size: int, epochs: int) -> list[int]:
    return progressive_sizes(size, epochs) if shape.progressive else [size] * epochs


def _step_times(shape: Shape, t: Timings, size: int, epochs: int) -> list[float]:
    """Seconds of one step in each epoch (sizes and frozen phases differ between epochs)."""
    sizes = _epoch_sizes(shape, size, epochs)
    frozen = [shape.strategy == "gradual" and e < shape.freeze_epochs for e in range(epochs)]
    return [t.step_s(s, f) for s, f in zip(sizes, frozen, strict=True)]


def _step_sum(shape: Shape, t: Timings, size: int, epochs: int) -> float:
    """Seconds of one step in each epoch, summed over the epochs."""
    return sum(_step_times(shape, t, size, epochs))


def _epoch_overhead_s(shape: Shape, t: Timings, size: int) -> float:
    return shape.val_images * t.eval_s(size) + t.save_s


def _final_s(shape: Shape, t: Timings, size: int) -> float:
    images = shape.test_images + shape.calibration_images
    return images * t.eval_s(size) + (FINAL_FIXED_S if shape.test_images else 0.0)


def _fit(shape: Shape, t: Timings, size: int, avail: float) -> tuple[int, int] | None:
    """(epochs, steps per epoch) spending ``avail`` seconds at ``size``: the fewest epochs
    whose equal step count fits without exceeding a full pass. None if one full epoch does
    not fit."""
    overhead = _epoch_overhead_s(shape, t, size)
    for epochs in itertools.count(1):
        steps = math.floor((avail - epochs * overhead) / _step_sum(shape, t, size, epochs))
        if epochs == 1 and steps < shape.full_steps:
            return None
        if steps < 1:  # validation alone would eat another epoch's time
            return epochs - 1, shape.full_steps
        if steps <= shape.full_steps:
            return epochs, steps
    raise AssertionError("unreachable")


def plan(
    budget_s: float,
    elapsed_s: float,
    shape: Shape,
    timings: Timings,
    sizes: tuple[int, ...],
) -> Plan:
    """The plan for the time left; ``sizes``: the one given resolution, or the ladder (each
    is timed only when the one below it reached :data:`MIN_EPOCHS`). A budget too small for
    one full epoch is a :class:`UserError` that names the smallest budget that would do."""
    chosen: tuple[int, int, int] | None = None
    for size in sizes:
        fit = _fit(shape, timings, size, budget_s - elapsed_s - _final_s(shape, timings, size))
        if fit is None or (chosen is not None and fit[0] < MIN_EPOCHS):
            break  # a larger size only when it still gets MIN_EPOCHS epochs
        chosen = (size, *fit)
        if fit[0] < MIN_EPOCHS:
            break
    if chosen is None:
        size = sizes[0]
        one = _epoch_overhead_s(shape, timings, size)
        one += shape.full_steps * _step_sum(shape, timings, size, 1)
        final = _final_s(shape, timings, size)
        need = elapsed_s + one + final
        raise UserError(
            f"--budget {format_duration(budget_s)} is too small for one epoch at {size} px here "
            f"(set-up {format_duration(elapsed_s)}, one epoch with validation "
            f"{format_duration(one)}, test evaluation {format_duration(final)}); use --budget "
            f"{format_duration(need * 1.05)} or more, or fewer images (--subset)"
        )
    size, epochs, steps = chosen
    step_time = steps * _step_sum(shape, timings, size, epochs)
    overhead = _epoch_overhead_s(shape, timings, size)
    return Plan(
        epochs=epochs,
        steps_per_epoch=steps,
        image_size=size,
        sizes=tuple(_epoch_sizes(shape, size, epochs)),
        images_per_s=epochs * steps * shape.global_batch / step_time,
        train_s=step_time + epochs * overhead,
        final_s=_final_s(shape, timings, size),
        budget_s=budget_s,
        elapsed_s=elapsed_s,
        epoch_s=tuple(steps * s + overhead for s in _step_times(shape, timings, size, epochs)),
    )


def plan_probe(
    budget_s: float,
    elapsed_s: Callable[[], float],
    feature_images: int,
    test_images: int,
    eval_s: Callable[[int], float],
    sizes: tuple[int, ...],
    fit_s: float = PROBE_FIT_S["cpu"],
) -> tuple[int, float]:
    """(resolution, expected seconds) for ``--strategy linear``: the largest of ``sizes``
    whose feature pass, head fit and test evaluation fit the budget (counting the cache as
    empty). Each size is timed only when the one below it fitted."""
    chosen: tuple[int, float] | None = None
    for size in sizes:
        total = elapsed_s() + (feature_images + test_images) * eval_s(size) + fit_s
        if total > budget_s:
            break
        chosen = (size, total)
    if chosen is None:
        raise UserError(
            f"--budget {format_duration(budget_s)} is too small for the linear probe at "
            f"{sizes[0]} px here ({feature_images:,} feature images, the head's fit and the "
            f"test evaluation take ~{format_duration(total)}); use --budget "
            f"{format_duration(total * 1.05)} or more, or fewer images (--subset)"
        )
    return chosen
