"""Flipped-VQA checkpoints: the trainable weights (plus optimizer state when training).

Files are read with ``torch.load(weights_only=True)``: tensors, containers and numbers only,
plus the one class the authors' files hold (``argparse.Namespace``). Nothing else is unpickled.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import FlipVQAError
from ..io import load_tensors, save_torch

log = logging.getLogger(__name__)

ALLOWED_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FlipVQAError(f"{path}: checkpoint not found")
    ckpt = load_tensors(path, "checkpoint", ALLOWED_GLOBALS, mmap=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise FlipVQAError(f"{path}: not a Flipped-VQA checkpoint (no 'model' dict of weights)")
    return ckpt


def stored_args(ckpt: dict) -> dict[str, Any]:
    """The run options a checkpoint recorded (``args``, an argparse.Namespace), or {}."""
    args = ckpt.get("args")
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


def expected_feature_dim(ckpt: Optional[dict], path: str | Path) -> Optional[tuple[int, str]]:
    """(the frame-feature width the checkpoint's ``visual_proj`` takes, who says so), or None
    without a checkpoint (the model then takes the features' own width)."""
    weight = ckpt["model"].get("visual_proj.weight") if ckpt else None
    if torch.is_tensor(weight) and weight.dim() == 2:
        return int(weight.shape[1]), f"{path}'s visual_proj"
    return None


def check_weights(path: Path | str, weights: dict, expected: dict[str, torch.Size]) -> None:
    """Every checkpoint weight must be a known trainable tensor of the right shape."""
    for name, tensor in weights.items():
        if name not in expected:
            raise FlipVQAError(f"{path}: unexpected weight {name!r} (this model has "
                               f"{len(expected)} trainable tensors)")
        if not torch.is_tensor(tensor) or tensor.shape != expected[name]:
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise FlipVQAError(f"{path}: {name} has shape {shape}, the model needs "
                               f"{tuple(expected[name])} (check --model, --adapter_len, "
                               f"--adapter_layer, --max_feats)")


def load_trainable(model: torch.nn.Module, path: str | Path, ckpt: Optional[dict] = None) -> dict:
    """Load a Flipped-VQA checkpoint's trainable weights into ``model`` (``ckpt``: the file's
    dict when it was read already); returns the file's dict."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
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


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so an interrupted save never leaves a truncated file."""
    save_torch(path, payload)
