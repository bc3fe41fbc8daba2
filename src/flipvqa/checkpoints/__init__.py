"""Reading backbones (Meta shards, Hugging Face folders) and Flipped-VQA checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import FlipVQAError
from ..model.llama import ModelArgs, Transformer, rope_frequencies
from .meta import is_meta_folder, load_meta
from .trainable import check_weights, load_checkpoint, save_checkpoint


def read_backbone(folder: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Arguments and weights (Meta names, interleaved rotary) of a Meta or Hugging Face folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlipVQAError(f"{folder}: backbone folder not found")
    if is_meta_folder(folder):
        return load_meta(folder)
    if (folder / "config.json").is_file():
        from .hf import load_hf

        return load_hf(folder)
    raise FlipVQAError(f"{folder}: neither a Meta LLaMA folder (params.json + consolidated.*.pth) "
                       f"nor a Hugging Face folder (config.json + *.safetensors)")


def build_backbone(folder: str | Path, device: torch.device, dtype: torch.dtype | None = None) -> Transformer:
    """The frozen backbone on ``device``: float32 on CPU, the checkpoint's dtype elsewhere."""
    args, state = read_backbone(folder)
    if dtype is None:
        file_dtype = state["tok_embeddings.weight"].dtype
        dtype = torch.float32 if device.type == "cpu" or not file_dtype.is_floating_point else file_dtype
    with torch.device("meta"):
        model = Transformer(args)
    if args.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FlipVQAError(f"{folder}: weights do not fit the backbone (missing: {missing[:3]}, "
                           f"unexpected: {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != expected[k]:
            raise FlipVQAError(f"{folder}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k])}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()},
                          strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_frequencies(args).to(device)  # a buffer, built on the meta device above
    return model


__all__ = ["build_backbone", "check_weights", "load_checkpoint", "read_backbone", "save_checkpoint"]
