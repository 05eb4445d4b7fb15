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
# The collective backend: NCCL on GPUs (one process per GPU), gloo on CPUs. Set to gloo on a
# GPU machine, several processes may share one GPU: slow, but it exercises DDP and --sync-bn
# on a one-GPU machine (NCCL refuses two ranks on one device).
BACKEND_VARIABLE = "CIFAR10_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


def dist_backend(device_type: str) -> str:
    """The backend torchrun's processes use: ``$CIFAR10_DIST_BACKEND``, else by device."""
    chosen = os.environ.get(BACKEND_VARIABLE, "").strip().lower()
    if not chosen:
        return "nccl" if device_type == "cuda" else "gloo"
    if chosen not in BACKENDS:
        raise UserError(f"{BACKEND_VARIABLE}={chosen!r}: must be one of {', '.join(BACKENDS)}")
    if chosen == "nccl" and device_type != "cuda":
        raise UserError(f"{BACKEND_VARIABLE}=nccl needs CUDA GPUs; unset it to use gloo on CPUs")
    return chosen


def pick_device(name: str, local_rank: int = 0, shared_gpu: bool = False) -> torch.device:
    """The device of the process with this ``LOCAL_RANK``: GPU ``local_rank`` under CUDA.
    ``shared_gpu`` (gloo on GPUs) lets ranks beyond the visible GPUs share them."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count and not shared_gpu:
            # Without this, two ranks land on one GPU and NCCL fails later as a hang or as
            # "other processes did not reach ...", which names neither the cause nor the fix.
            raise UserError(
                f"LOCAL_RANK {local_rank} but {count} GPU(s) visible: start torchrun with "
                f"--nproc-per-node {count} or fewer (one process per GPU), or set "
                f"{BACKEND_VARIABLE}=gloo to let processes share a GPU (slow; for testing)"
            )
        return torch.device("cuda", local_rank % count)
    return torch.device(name)


# Expected memory of one ResNet-50 training step under bf16/fp16 autocast, per image and input
# pixel: NVIDIA's DeepLearningExamples train ResNet-50 with AMP at batch 256, 224 px on 16 GB
# V100s, i.e. at most ~60 MB an image at 224² ≈ 1.2 KB a pixel. Expected, not measured here:
# the device check's "peak GPU memory" row records it at batch 512, 160 px.
STEP_BYTES_PER_PIXEL = 1200
STATE_BYTES = 4 * 4 * 26_000_000  # fp32 weights, gradients and up to two optimizer moments
GPU_BATCHES = (512, 256, 128, 64, 32)


def gpu_free_bytes(device: torch.device) -> int:
    return int(torch.cuda.mem_get_info(device)[0])


def step_bytes(batch: int, image_size: int) -> int:
    """Expected device memory of a training step: the model's state and the activations."""
    return STATE_BYTES + batch * STEP_BYTES_PER_PIXEL * image_size**2


def gpu_default_batch(device: torch.device, image_size: int) -> int:
    """The default per-process batch on this GPU: the largest of ``GPU_BATCHES`` whose step
    fits in 80 % of the free memory (512 on 40 GB and larger cards at 160 px; an estimated
    out-of-memory error on 16–24 GB cards otherwise), the smallest when none does."""
    room = 0.8 * gpu_free_bytes(device)
    return next((b for b in GPU_BATCHES if step_bytes(b, image_size) <= room), GPU_BATCHES[-1])


def images_fit_on(device: torch.device, images_bytes: int, batch: int, image_size: int) -> bool:
    """Whether the training images can live on ``device`` beside a step's working set; if
    not, they stay in pinned host memory and each batch is copied (``augment``). A step that
    does not fit even alone is a one-line error that says which flag to change."""
    if device.type != "cuda":
        return True
    free = gpu_free_bytes(device)
    need = step_bytes(batch, image_size)
    if need > 0.9 * free:
        raise UserError(
            f"a training step at batch {batch} and {image_size} px needs ~{need / 2**30:.1f} GiB "
            f"of GPU memory; {free / 2**30:.1f} GiB are free. Lower --batch-size or --image-size"
        )
    return images_bytes + need <= 0.9 * free


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
    backend: str | None = None  # "nccl" or "gloo" under torchrun

    @property
    def shares_gpu(self) -> bool:
        """gloo on GPUs: ranks may share a device (``$CIFAR10_DIST_BACKEND``)."""
        return self.backend == "gloo"

    def device(self, name: str) -> torch.device:
        """This process's device for ``--device NAME``."""
        return pick_device(name, self.local_rank, shared_gpu=self.shares_gpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> Process:
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        if world == 1:
            return cls(rank, local_rank, world)
        process = cls(rank, local_rank, world, dist_backend(device_type))
        if not torch.distributed.is_initialized():
            device = process.device(device_type)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(
                process.backend,
                timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S),
                # NCCL binds its communicator to this GPU at once (no guessing from the rank)
                device_id=device if process.backend == "nccl" else None,
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

    def least(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (identity without torchrun)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t)

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
    """BatchNorm whose training statistics cover every process's batch, under gloo.

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


def convert_sync_bn(model: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """``--sync-bn``: torch's SyncBatchNorm under NCCL; :class:`CpuSyncBatchNorm` under gloo
    (CPUs, or processes sharing a GPU: gloo has no all-gather on GPU tensors, which torch's
    SyncBatchNorm needs; the all-reduce this one uses works on both)."""
    if backend == "nccl":
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
            convert_sync_bn(child, backend)
    return model
