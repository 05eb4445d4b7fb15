"""The loop's seam: :class:`Callback` hooks at each step, host sync and epoch end.

TensorBoard logging is one (``board.Board``); tests that record steps or inject faults are
others (no test patches the loop's functions). Callbacks run on every rank: write files only
where ``trainer.process.is_main``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

# The hooks receive the run (``trainer.Trainer``) and its position (``checkpoint.RunState``);
# typed Any here, so that this seam sits below everything that uses it.
Trainer = RunState = Any


@dataclasses.dataclass
class StepOutput:
    """A step's results, on the device. A callback may replace ``loss`` (tests inject a NaN
    there); the loop's NaN check and running sums read it after the callbacks."""

    loss: torch.Tensor  # float scalar
    logits: torch.Tensor  # float [B,C]


class Callback:
    """Override what you need; every hook is a no-op here."""

    def step_end(self, trainer: Trainer, state: RunState, out: StepOutput) -> None:
        """After each optimizer step, still at the step's resolution; no host sync here."""

    def sync(self, trainer: Trainer, state: RunState, loss: float, img_per_s: float) -> None:
        """At each host sync: the mean loss since the last one, the throughput so far."""

    def epoch_end(
        self, trainer: Trainer, state: RunState, row: dict[str, Any], val_logits: Any
    ) -> None:
        """After the epoch's row is written and its checkpoints saved (``state`` already
        points at the next epoch); ``val_logits``: this rank's validation logits, or None."""
