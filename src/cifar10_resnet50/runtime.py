"""Device, precision and the distributed context shared by training and evaluation."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import DEVICES
from .errors import UserError

log = logging.getLogger(__name__)

# How long a collective (a barrier, the gradient all-reduce) may wait for the other ranks
# before it fails: bounds the hang when one process dies without torchrun noticing (another
# machine's). Rank 0 downloading CIFAR-10 (163 MB) and the weights (98 MB) fits in it.
DIST_TIMEOUT_S = int(os.environ.get("CIFAR10_DIST_TIMEOUT", "600"))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    auto: bf16 on GPUs that have it (no loss scaling needed), else fp16 with a grad scaler;
    bf16 on CPUs with AVX512-BF16/AMX (measured here: 1.25× fp32 for ResNet-50 training at
    64 px, 1.75× for inference), else fp32.
    """
    if name == "fp32":
        return None
    if device.type == "cuda":
        if name == "bf16" or (name == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16
    if name == "fp16":
        raise UserError("--precision fp16 is for CUDA; on the CPU use bf16 or fp32")
    if name == "bf16" and not cpu_supports_bf16():
        raise UserError("--precision bf16: this CPU has no fast bf16; use fp32")
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class RankFailed(UserError):
    """Another process of the job failed or vanished; this one stops too."""


@dataclass(frozen=True)
class Process:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun).

    ``from_env`` initialises the process group from torchrun's environment (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``): NCCL on CUDA, gloo on the CPU.
    Everything rank-dependent goes through here: writing files and progress (``is_main``),
    the data shard (``rank``/``world_size``), waiting for rank 0 (``main_first``), summing
    metrics (``all_reduce``) and agreeing to stop (``any``).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> Process:
        world = int(os.environ.get("WORLD_SIZE", 1))
        process = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world)
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(process.local_rank % torch.cuda.device_count())
            torch.distributed.init_process_group(
                backend, timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S)
            )
        return process

    def barrier(self, why: str) -> None:
        if not self.distributed:
            return
        try:
            torch.distributed.barrier()
        except Exception as e:  # a timeout, or a peer that is gone
            raise RankFailed(
                f"rank {self.rank}: the other processes did not reach '{why}' "
                f"({type(e).__name__}); see the first failing rank's message above"
            ) from None

    @contextlib.contextmanager
    def main_first(self, why: str) -> Iterator[None]:
        """Rank 0 runs the block first (downloads, caches), then the others, from its files."""
        if not self.is_main:
            self.barrier(why)
        yield
        if self.is_main:
            self.barrier(why)

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; identity without torchrun)."""
        if self.distributed:
            torch.distributed.all_reduce(values)
        return values

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """For each flag: is it set on any rank? One small all-reduce (a host sync)."""
        if not self.distributed:
            return flags
        t = torch.tensor([float(f) for f in flags], device=device)
        return [bool(v > 0) for v in self.all_reduce(t).tolist()]

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics cover every process's batch, on the CPU.

    Hand-written because ``torch.nn.SyncBatchNorm`` runs on GPUs only (it raises for CPU
    tensors), and ``--sync-bn`` under torchrun with gloo must mean the same thing: the
    per-channel sum, sum of squares and count are summed over ranks with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce`` (gradients flow back through it, as in
    SyncBatchNorm), then normalised as BatchNorm does. Keys and buffers are BatchNorm2d's,
    so checkpoints stay plain.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()  # [B,C,H,W]; statistics in fp32 (as BatchNorm under autocast)
        count = torch.tensor([xf.numel() / c], dtype=xf.dtype, device=x.device)
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        scale = self.weight / torch.sqrt(var + self.eps)
        shift = self.bias - mean * scale
        return xf * scale[None, :, None, None] + shift[None, :, None, None]


def convert_sync_bn(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """``--sync-bn``: torch's SyncBatchNorm on GPUs, :class:`CpuSyncBatchNorm` on CPUs."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d) and not isinstance(child, CpuSyncBatchNorm):
            sync = CpuSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_bn(child, device_type)
    return model
