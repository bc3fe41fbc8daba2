"""Flipped-VQA checkpoints: the trainable weights (plus optimizer state when training).

Files are read with ``torch.load(weights_only=True)``: tensors, containers and numbers only,
plus the one class the authors' files hold (``argparse.Namespace``). Nothing else is unpickled.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import FlipVQAError

ALLOWED_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FlipVQAError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlipVQAError(f"{path}: cannot be loaded safely ({first_line})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise FlipVQAError(f"{path}: not a Flipped-VQA checkpoint (no 'model' dict of weights)")
    return ckpt


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


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so an interrupted save never leaves a truncated file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
