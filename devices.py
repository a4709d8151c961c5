"""Where tensors run: the one device rule, the AMP dtype, autocast, and host-to-device copies.

Every mode (train, extract, test, eval, serve) resolves `--device` and `--amp` here, so they
mean the same everywhere.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from config import AMP_MODES

logger = logging.getLogger(__name__)

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def set_threads(threads: int | None) -> None:
    """`--threads`: torch's CPU threads for this process; None keeps torch's default (all cores).

    On a busy machine fewer threads than cores is faster: OpenMP threads that wait for a core spin
    (measured: 12x slower with 2 threads than 1 on 2 shared cores).
    """
    if threads:
        torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands in a torchrun job (world_size 1 when not launched by it)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.enabled:
            dist.barrier()


def init_distributed(device_choice: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Long timeout: ranks > 0 wait at a collective while rank 0 decodes the validation set.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    logger.info("distributed: rank %d of %d (%s)", rank, world_size, dist.get_backend())
    return Dist(rank, world_size, local_rank)


def resolve_device(choice: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` (or None) picks CUDA when present, else the CPU; `cuda` without a GPU is an error,
    never a silent CPU run. Under torchrun (`local_rank` given) `cuda` means this rank's GPU."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    choice = "auto" if choice is None else choice
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {choice!r} is not a device; expected {DEVICE_FORMS}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {choice!r} is not supported; expected {DEVICE_FORMS}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {choice} was asked for but no CUDA GPU is visible; use --device cpu")
    if device.index is None:
        index = local_rank if local_rank is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
    if device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {choice}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp`, or None for full float32.

    auto: bf16 on a CUDA GPU that computes it natively (Ampere and newer), else fp16 (with the
    gradient scaler); off on the CPU. torch counts emulated bf16 (V100, T4) as supported unless
    asked not to; there fp16 with loss scaling is the fast choice.
    """
    if mode not in AMP_MODES:
        raise ValueError(f"--amp {mode!r} is not one of {', '.join(AMP_MODES)}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (float16 on CPU is slow and needs a "
                         "gradient scaler); use --amp bf16 or --amp off")
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.bfloat16
    return torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """The --amp name of a resolved autocast dtype: bf16, fp16 or off."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on `device` when `dtype` is given; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` without waiting: asynchronous from pinned host memory (loaders pin it)."""
    return x.to(device, non_blocking=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel/DDP wrappers."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model
