"""``--compile auto|on|off``: whether the training step runs through ``torch.compile``.

``torch.compile`` builds one graph per input shape and backbone state: every resolution of
``--progressive`` and the frozen and unfrozen phases of ``--strategy gradual`` are separate
compiles (~65 s each on an H100), and past torch's ``recompile_limit`` (8) the rest of the
run silently falls back to eager. So a run's compile cost is its number of graphs
(:func:`graphs`) times the cost of one.

``on`` compiles from the first step and raises the recompile limit to the run's graphs.
``off`` never compiles. ``auto`` times eager steps at the loop's host syncs (never the first
window of an epoch: it holds warm-up and the epoch's start), carries that time to every epoch
left by its pixel count, and compiles once :func:`compile_pays`: the time compiling saves
exceeds what compiling every graph costs. Rank 0's timing decides for every rank. ``auto``
stays eager under ``--sync-bn`` (graph breaks at every SyncBatchNorm layer: nothing to gain)
and under ``--budget``, whose plan cannot hold a compile of unknown length; ``--budget``'s
step timing never compiles (``planning``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# Measured (issue 6, one H100, 160 px, batch 512): eager 7,483 img/s, compiled 10,726 (1.43×),
# first epoch with compilation 65 s. On this 2-core CPU the compiled step measured +12 % once
# (issue 2) and 0.68× eager in benchmarks/compile_cost.py (cold compile 76 s, warm-cache 5 s):
# no reliable gain, so `auto` never compiles on a CPU (speed-up 1.0); `--compile on` still does.
COMPILE_COST_S = {"cuda": 65.0, "cpu": 76.0}  # per graph
COMPILE_SPEEDUP = {"cuda": 1.43, "cpu": 1.0}
TIMED_STEPS = 20  # eager steps timed before `--compile auto` decides
RECOMPILE_LIMIT = 8  # torch._dynamo's default


@dataclasses.dataclass(frozen=True)
class Work:
    """An epoch's training steps as compiling sees them: its shape and backbone state."""

    size: int  # px
    frozen: bool
    steps: int


def graphs(work: Sequence[Work]) -> int:
    """The distinct graphs ``torch.compile`` builds for this work: one per (size, frozen)."""
    return len({(w.size, w.frozen) for w in work})


def compile_pays(
    device_type: str, seconds_per_step: float, size: int, work: Sequence[Work]
) -> bool:
    """`--compile auto`: compile when the time compiling saves on ``work`` (the epochs left,
    eager time carried from ``seconds_per_step`` at ``size`` px by pixel count; a frozen step
    counts as a full one, which errs towards compiling) exceeds one compile per graph. With
    the inductor's on-disk cache warm, a second run of the same shapes costs less, so this
    rule is conservative for repeated runs."""
    eager_s = sum(w.steps * seconds_per_step * (w.size / size) ** 2 for w in work)
    saved = eager_s * (1 - 1 / COMPILE_SPEEDUP[device_type])
    return saved > graphs(work) * COMPILE_COST_S[device_type]


def raise_recompile_limit(needed: int) -> None:
    """Let torch build every graph the run needs instead of falling back to eager after 8."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < needed:
        log.info("--compile: %d graphs (sizes × backbone states); recompile limit raised", needed)
        setattr(config, name, needed)


@dataclasses.dataclass
class CompilePolicy:
    """Whether the step is compiled now, and (``auto``) the timing that decides it."""

    device_type: str
    compiled: bool
    deciding: bool  # `auto` that has not decided yet
    changed: bool = False  # compiled since the step's module was last built
    since: tuple[float, int] | None = None  # (seconds, step) where this epoch's timing began

    @classmethod
    def from_setting(
        cls, setting: str, device_type: str, work: Sequence[Work], *, sync_bn: bool = False
    ) -> CompilePolicy:
        """The policy for a run that will do ``work`` (every epoch's)."""
        if sync_bn and setting == "auto":
            log.info("--compile auto: staying eager (SyncBatchNorm breaks the graph per layer)")
            setting = "off"
        elif sync_bn and setting == "on":
            log.warning(
                "--compile on with --sync-bn: every SyncBatchNorm layer breaks the graph, so "
                "compiling gains little; --compile off saves the compile time"
            )
        if setting == "on":
            raise_recompile_limit(max(RECOMPILE_LIMIT, graphs(work)))
        return cls(device_type, compiled=setting == "on", deciding=setting == "auto")

    def start_epoch(self) -> None:
        self.since = None

    def at_sync(
        self,
        now: float,
        step: int,
        size: int,
        work_left: Callable[[], Sequence[Work]],
        agree: Callable[[bool], bool],
    ) -> None:
        """At a host sync of the loop (``now``: seconds, after the device finished its work;
        ``step``: steps done; ``size``: px of the steps timed; ``work_left``: the steps left,
        by epoch): time, then decide once. ``agree(decision)`` returns rank 0's decision on
        every rank (a compiled and an eager DDP rank would still agree on gradients, but not
        on speed)."""
        if not self.deciding:
            return
        if self.since is None:
            self.since = (now, step)  # from the first sync on: warm-up steps excluded
            return
        if step - self.since[1] < TIMED_STEPS:
            return
        per_step = (now - self.since[0]) / (step - self.since[1])
        work = work_left()
        decision = agree(compile_pays(self.device_type, per_step, size, work))
        log.info(
            "--compile auto: %.3f s/step eager at %d px, %d steps and %d graph(s) left → %s",
            per_step, size, sum(w.steps for w in work), graphs(work),
            "compiling" if decision else "staying eager (compiling would not pay)",
        )  # fmt: skip
        self.deciding = False
        if decision:
            raise_recompile_limit(max(RECOMPILE_LIMIT, graphs(work)))
            self.compiled = self.changed = True
