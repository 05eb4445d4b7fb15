"""Weight EMA (``--ema DECAY``): an exponential moving average of the weights, BatchNorm
statistics included, updated after every optimizer step; validation, ``best.pt`` and the
test report use it.

Written here rather than taken from ``torch.optim.swa_utils.AveragedModel``: that class keeps
its update count on the device and reads it back (``bool(self.n_averaged == 0)``) at every
update, a host sync per step that stalls a GPU, and it has no warm-up. This is timm's
``ModelEmaV3`` in short: the count is a Python int, the update one ``_foreach_lerp_``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

# timm's warm-up (ModelEmaV3): decay_t = min(decay, 1 - (1 + t)^-power). Early averages then
# forget the random start quickly (t = 100: 0.969; t = 1,000: 0.9944); timm advises a power of
# 3/4 for runs of up to ~1M steps, ours are thousands.
WARMUP_POWER = 0.75


def decay_at(decay: float, updates: int) -> float:
    return min(decay, 1.0 - (1.0 + updates) ** -WARMUP_POWER)


class WeightAverage:
    """A copy of the model whose weights and buffers follow the trained ones by
    ``w_ema ← w_ema + (1 - decay_t) (w - w_ema)``; integer buffers (BatchNorm's batch counts)
    are copied. Never trained: always in eval mode."""

    def __init__(self, model: torch.nn.Module, decay: float):
        assert 0 < decay < 1, decay
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _tensors(self, model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = zip(self.module.state_dict().values(), model.state_dict().values(), strict=True)
        return list(pairs)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """After an optimizer step of ``model`` (the bare model, not a DDP or compiled wrapper:
        the same state dict keys)."""
        floats_avg, floats_new = [], []
        for avg, new in self._tensors(model):
            if avg.is_floating_point():
                floats_avg.append(avg)
                floats_new.append(new.detach())
            else:
                avg.copy_(new)
        weight = 1.0 - decay_at(self.decay, self.updates)
        torch._foreach_lerp_(floats_avg, floats_new, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
