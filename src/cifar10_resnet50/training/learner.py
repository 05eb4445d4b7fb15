"""A run driven step by step (fastai's ``Learner``): fit some epochs, unfreeze, fit again with
another lr, evaluate, save. The one-shot ``train`` command runs one :meth:`Learner.fit` over
its configured epochs on the same object (``train.run``).

Each :meth:`fit` with ``epochs`` gets a schedule of its own over those epochs (warm-up, then
the decay of ``--schedule``), as fastai's ``fit_one_cycle`` does per call; the run's position
(epochs, steps), best validation accuracy, ``last.pt``/``best.pt`` and ``metrics.jsonl`` carry
on across calls. Such a run is for evaluate/predict/export: ``--resume`` continues runs
started by ``train``, whose schedule is one plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..config import Config, resolve
from ..errors import UserError
from ..runtime import Process
from . import core, loop, metrics, trainer
from .callbacks import Callback
from .trainer import Trainer


class Learner:
    """A built run (:class:`trainer.Trainer`) and its position (``checkpoint.RunState``)."""

    def __init__(self, t: Trainer, state: checkpoint.RunState):
        self.t, self.state = t, state

    @classmethod
    def create(cls, cfg: Config, out: str | Path | None = None) -> Learner:
        """A fresh run of ``cfg`` (its epochs are set by each :meth:`fit`), in ``out``."""
        process = Process.from_env(cfg.train.device)
        device = process.device(cfg.train.device)
        folder = trainer.run_folder(out or cfg.train.out)
        train_cfg = dataclasses.replace(cfg.train, out=str(folder), epochs=1)
        cfg = resolve(dataclasses.replace(cfg, train=train_cfg), device.type, process.world_size)
        t = trainer.build(cfg, folder, process)
        return cls(t, checkpoint.RunState())

    # ------------------------------------------------------------------ the backbone

    def freeze(self) -> None:
        """Train the head alone (BatchNorm statistics kept) from the next :meth:`fit` on."""
        self._strategy("linear")

    def unfreeze(self) -> None:
        """Train every layer (the backbone at ``lr × backbone_lr_scale`` when pretrained)."""
        self._strategy("full")

    def _strategy(self, strategy: str) -> None:
        tc = dataclasses.replace(self.t.cfg.train, strategy=strategy)
        self.t.set_config(dataclasses.replace(self.t.cfg, train=tc))

    # ------------------------------------------------------------------ training

    def fit(
        self,
        epochs: int | None = None,
        lr: float | None = None,
        callbacks: list[Callback] | None = None,
        stop_after: int | None = None,
    ) -> bool:
        """Train ``epochs`` more epochs with a schedule of their own (peak ``lr``, default the
        run's); None: to the run's configured last epoch on the schedule it was built with
        (the ``train`` command). True if stopped early (``last.pt`` saved)."""
        if epochs is not None:
            self._new_schedule(epochs, lr)
        return loop.fit(self.t, self.state, list(callbacks or []), stop_after)

    def _new_schedule(self, epochs: int, lr: float | None) -> None:
        t, cfg = self.t, self.t.cfg
        if epochs < 1:
            raise UserError("fit(epochs) needs at least 1 epoch")
        optim = dataclasses.replace(cfg.optim, lr=lr if lr is not None else cfg.optim.lr)
        tc = dataclasses.replace(cfg.train, epochs=self.state.epoch + epochs)
        t.set_config(dataclasses.replace(cfg, optim=optim, train=tc))
        previous = t.opt.ema  # the weight average carries on across calls
        t.opt = core.Optimization.build(
            t.model, optim, pretrained=cfg.model.weights != "none", head_only=False,
            total_steps=epochs * t.steps_per_epoch, amp_dtype=t.amp_dtype,
            device_type=t.device.type, ema=cfg.train.ema if previous is None else 0.0,
        )  # fmt: skip
        if previous is not None:
            t.opt.ema = previous
        t.compile = trainer.compile_policy(t.cfg, t.device.type, t.steps_per_epoch)
        t.forward = None  # rebuilt around the model for the new run (DDP, compile)

    # ------------------------------------------------------------------ results

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics rows of every epoch so far (``metrics.jsonl``)."""
        return metrics.read(self.t.out / metrics.NAME)

    def evaluate(self, test_images: int | None = None) -> Any:
        """The test report of the weights the run validates (the EMA's, with ``--ema``)."""
        from ..evaluation import evaluate

        s, t = self.t.split, self.t
        x, y = evaluate.test_subset(s.arrays.test_x, s.arrays.test_y, test_images)
        return evaluate.evaluate_model(
            t.opt.evaluated(t.model), list(t.meta["classes"]), x, y,
            out_dir=t.out / "eval", source=t.saver.last, device=t.device,
            amp_dtype=t.amp_dtype, batch_size=t.cfg.train.eval_batch_size, plot=False,
        )  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """The evaluated weights as a model checkpoint (what ``best.pt`` holds: predict,
        evaluate, export and serve take it)."""
        t = self.t
        weights = checkpoint.host_copy(t.opt.evaluated(t.model).state_dict())
        payload = {"model_meta": t.meta, "model": weights, "config": t.cfg.to_dict()}
        checkpoint.save(path, {**payload, "metrics": (self.history or [{}])[-1]})
        return Path(path)
