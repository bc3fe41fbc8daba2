"""Where the computation runs: the device, the torchrun process group, mixed precision, seeds."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as torch_dist

from .errors import FlipVQAError

# The canonical --dtype names (config.DTYPE_SPELLINGS maps the usual spellings onto them).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def available_devices() -> list[str]:
    """What ``--device`` can name on this machine."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: Optional[str | torch.device]) -> torch.device:
    """``device`` as a torch.device, by default CUDA when available; a device this machine does
    not have is one line that lists those it has."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ", ".join(available_devices())
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise FlipVQAError(f"--device {device}: not a device name; this machine has: {here}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise FlipVQAError(f"--device {device}: no CUDA device is available; this machine has: {here}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise FlipVQAError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices; "
                               f"this machine has: {here}")
    elif resolved.type != "cpu" and resolved.type not in available_devices():
        raise FlipVQAError(f"--device {device}: not available; this machine has: {here}")
    return resolved


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str]) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolved
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        torch.cuda.set_device(local)
        resolved = torch.device(f"cuda:{local}")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Dist(rank, world, local), resolved


def close_distributed(wait: bool = False) -> None:
    """Leave the process group (at exit, so that no rank is torn down mid-collective). ``wait``
    (a command that finished): first wait for every rank, so that a rank done early does not tear
    its connections down while rank 0 still writes its results (a failed rank does not wait:
    torchrun stops the others)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in the frozen weights' dtype (bf16/fp16), so that the float32 trainable
    parts meet them in matmuls; plain float32 (the default on CPU) runs without autocast."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
