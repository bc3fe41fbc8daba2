"""What train, eval, bench and ask share: device and process group, the model, the datasets."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as torch_dist

from . import data
from .checkpoints import build_backbone, check_weights, load_checkpoint
from .config import backbone_folder, default_tokenizer_path
from .data.dataset import VQADataset
from .errors import FlipVQAError
from .model.flipped import FlipConfig, FlippedVQA
from .prompts import TASKS
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlipVQAError(f"--device {device}: no CUDA device is available (use --device cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local), torch.device(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in the frozen weights' dtype (bf16/fp16), so that the float32 trainable
    parts meet them in matmuls; plain float32 (the default on CPU) runs without autocast."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[FlippedVQA, Tokenizer]:
    """Backbone (frozen) + Flipped-VQA parts (float32) on ``device``, and the tokenizer."""
    folder = backbone_folder(args)
    if not Path(args.tokenizer_path).exists():  # e.g. a hub id, whose files arrived just now
        args.tokenizer_path = default_tokenizer_path(str(folder), "")
    tokenizer = load_tokenizer(args.tokenizer_path)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if dtype is not None and device.type == "cpu" and dtype != torch.float32:
        log.warning("--dtype %s on CPU is slow; float32 is the default there", args.dtype)
    backbone = build_backbone(folder, device, dtype)
    if tokenizer.n_words > backbone.args.vocab_size:
        raise FlipVQAError(f"{args.tokenizer_path}: {tokenizer.n_words} tokens, more than the backbone's "
                           f"vocabulary of {backbone.args.vocab_size}")
    return wrap_backbone(backbone, args, device), tokenizer


def wrap_backbone(backbone, args: argparse.Namespace, device: torch.device) -> FlippedVQA:
    """The Flipped-VQA parts (float32) around a frozen backbone, as the run options say."""
    adapter_layer = args.adapter_layer or backbone.args.n_layers
    if adapter_layer > backbone.args.n_layers:
        raise FlipVQAError(f"--adapter_layer {adapter_layer} is larger than the backbone's "
                           f"{backbone.args.n_layers} layers")
    cfg = FlipConfig(adapter_len=args.adapter_len, adapter_layer=adapter_layer, max_feats=args.max_feats,
                     bias=args.bias, tau=args.tau, vaq=args.vaq, qav=args.qav,
                     skip_unadapted_layers=args.skip_unadapted_layers)
    model = FlippedVQA(backbone, cfg)
    for _, p in model.trainable_parameters():
        p.data = p.data.to(device=device, dtype=torch.float32)
    model.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        for layer in model.backbone.layers:
            layer.compile(dynamic=True)  # sequence lengths vary from batch to batch
    return model


def load_trainable(model: FlippedVQA, path: str | Path) -> dict:
    """Load a Flipped-VQA checkpoint's trainable weights into ``model``; returns the file's dict."""
    ckpt = load_checkpoint(path)
    expected = {name: p.shape for name, p in model.trainable_parameters()}
    check_weights(path, ckpt["model"], expected)
    missing = sorted(set(expected) - set(ckpt["model"]))
    if missing:
        log.warning("%s: %d trainable tensors are not in the checkpoint and keep their initial values "
                    "(e.g. %s)", path, len(missing), ", ".join(missing[:3]))
    with torch.no_grad():
        params = dict(model.trainable_parameters())
        for name, tensor in ckpt["model"].items():
            params[name].copy_(tensor)
    return ckpt


def build_dataset(args: argparse.Namespace, tokenizer: Tokenizer, split: str, train: bool,
                  features: Optional[dict] = None) -> VQADataset:
    records = data.load_split(args.data_path, args.dataset, split, args.sub, features)
    # Training encodes only the objectives that are on; evaluation scores with VQA alone.
    tasks = tuple(t for t in TASKS if t == "vqa" or getattr(args, t)) if train else ("vqa",)
    return VQADataset(records, tokenizer, data.n_options(args.dataset), args.max_feats, args.max_seq_len,
                      args.sub, train=train, tasks=tasks, name=f"{args.dataset} {split}")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
