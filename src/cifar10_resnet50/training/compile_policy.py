"""``--compile auto|on|off``: whether the training step runs through ``torch.compile``.

``on`` compiles from the first step, ``off`` never does. ``auto`` times eager steps at the
loop's host syncs (never the first window of an epoch: it holds warm-up and the epoch's
start) and compiles once :func:`compile_pays`: the time compiling saves on the steps left
exceeds what compiling costs. Rank 0's timing decides for every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# Measured (issue 6, one H100, 160 px, batch 512): eager 7,483 img/s, compiled 10,726 (1.43×),
# first epoch with compilation 65 s. On this 2-core CPU the compiled step measured +12 % once
# (issue 2) and 0.68× eager in benchmarks/compile_cost.py (cold compile 76 s, warm-cache 5 s):
# no reliable gain, so `auto` never compiles on a CPU (speed-up 1.0); `--compile on` still does.
COMPILE_COST_S = {"cuda": 65.0, "cpu": 76.0}
COMPILE_SPEEDUP = {"cuda": 1.43, "cpu": 1.0}
TIMED_STEPS = 20  # eager steps timed before `--compile auto` decides


def compile_pays(device_type: str, seconds_per_step: float, steps_left: int) -> bool:
    """`--compile auto`: compile when the time it saves on the steps left exceeds its cost.
    With the inductor's on-disk cache warm, a second run of the same shapes costs less, so
    this rule is conservative for repeated runs."""
    saved = steps_left * seconds_per_step * (1 - 1 / COMPILE_SPEEDUP[device_type])
    return saved > COMPILE_COST_S[device_type]


@dataclasses.dataclass
class CompilePolicy:
    """Whether the step is compiled now, and (``auto``) the timing that decides it."""

    device_type: str
    compiled: bool
    deciding: bool  # `auto` that has not decided yet
    changed: bool = False  # compiled since the step's module was last built
    since: tuple[float, int] | None = None  # (seconds, step) where this epoch's timing began

    @classmethod
    def from_setting(cls, setting: str, device_type: str) -> CompilePolicy:
        return cls(device_type, compiled=setting == "on", deciding=setting == "auto")

    def start_epoch(self) -> None:
        self.since = None

    def at_sync(
        self, now: float, step: int, steps_left: int, agree: Callable[[bool], bool]
    ) -> None:
        """At a host sync of the loop (``now``: seconds, after the device finished its work;
        ``step``: steps done): time, then decide once. ``agree(decision)`` returns rank 0's
        decision on every rank (a compiled and an eager DDP rank would still agree on
        gradients, but not on speed)."""
        if not self.deciding:
            return
        if self.since is None:
            self.since = (now, step)  # from the first sync on: warm-up steps excluded
            return
        if step - self.since[1] < TIMED_STEPS:
            return
        per_step = (now - self.since[0]) / (step - self.since[1])
        decision = agree(compile_pays(self.device_type, per_step, steps_left))
        log.info(
            "--compile auto: %.3f s/step eager, %d steps left → %s",
            per_step,
            steps_left,
            "compiling" if decision else "staying eager (compiling would not pay)",
        )
        self.deciding = False
        if decision:
            self.compiled = self.changed = True
