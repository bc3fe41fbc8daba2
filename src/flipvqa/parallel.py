"""``--fsdp``: the frozen backbone sharded over the torchrun processes with FSDP2.

Each transformer block is one FSDP unit (``torch.distributed.fsdp.fully_shard``): a process holds
1/world of its weights and gathers the whole block only while it runs. The embedding and the
output layer are units of their own; the final norm and the rotary table are tiny and stay whole.
The trainable Flipped-VQA parts are NOT sharded: they are small (float32, a few MB per layer),
every process keeps a full copy and their gradients are averaged as without FSDP
(:func:`flipvqa.loops.optimizer_step`), so checkpoints, the optimizer state and the numbers are
those of a run without FSDP.

Sharded units gather their weights with collectives, so every process must run the same
sequence of block calls. What could differ between processes is made to agree
(:attr:`FlippedVQA.agree`: whether a prefix is shared or cached, whether scoring takes the
shared-prefix path), and evaluation runs as many batches on every process
(:func:`flipvqa.loops.score_split` with ``lockstep``).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as torch_dist

from .devices import Dist
from .errors import FlipVQAError
from .model.flipped import FlippedVQA

log = logging.getLogger(__name__)


def shard_backbone(model: FlippedVQA, device: torch.device, dist: Dist) -> bool:
    """Shard ``model``'s frozen backbone over the process group; False (and a warning) when
    there is a single process and so nothing to shard."""
    if not dist.enabled:
        log.warning("--fsdp without torchrun: one process holds the whole backbone (nothing to shard)")
        model.backbone.to(device)  # staged on the CPU by build_model
        return False
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6
        raise FlipVQAError(f"--fsdp needs PyTorch's FSDP2 (torch >= 2.6; this is {torch.__version__}): {exc}") \
            from None
    # A block returns its keys/values as transposed views; nothing writes to them in place, which
    # is what this FSDP warning is about.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh(device.type, (dist.world_size,))
    backbone = model.backbone
    for block in backbone.layers:
        fully_shard(block, mesh=mesh)
    if not backbone.args.tie_embeddings:  # a tied output layer is the embedding: both stay whole
        fully_shard(backbone.tok_embeddings, mesh=mesh)
        fully_shard(backbone.output, mesh=mesh)
    # fully_shard moved each unit's shard to the device; what is not sharded (norm, rotary
    # table, a tied embedding) is still where build_model staged it.
    backbone.to(device)
    model.agree = _all_ranks_agree(device)
    log.info("--fsdp: the backbone's %d blocks sharded over %d processes", len(backbone.layers), dist.world_size)
    return True


def _all_ranks_agree(device: torch.device):
    """``agree(flag)``: True on every process when ``flag`` is True on every process."""

    def agree(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        return bool(t.item())

    return agree
