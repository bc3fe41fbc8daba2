"""Files into models: locating and reading backbones (Meta shards, Hugging Face folders), the
tokenizer beside them, and the Flipped-VQA parts around them (their checkpoints in
:mod:`flipvqa.checkpoints.trainable`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..devices import DTYPES
from ..errors import FlipVQAError
from ..model.flipped import FlipConfig, FlippedVQA
from ..model.llama import ModelArgs, Transformer, rope_frequencies
from ..quantize import quantize_backbone
from ..tokenizer import Tokenizer, load_tokenizer
from .meta import is_meta_folder, load_meta
from .trainable import check_weights, load_checkpoint, load_trainable, save_checkpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- where the files are
def backbone_folder(args: argparse.Namespace) -> Path:
    """``--model`` names a folder under ``--llama_model_path``, or is itself a path, or a
    Hugging Face hub id (``owner/name``, fetched when online)."""
    under = Path(args.llama_model_path) / args.model
    if under.is_dir():
        return under
    direct = Path(args.model)
    if direct.is_dir():
        return direct
    if args.model.count("/") == 1 and not args.model.startswith((".", "/")):
        from .hf import resolve_backbone

        return resolve_backbone(args.model)
    return under  # reported as missing by the loader


def default_tokenizer_path(llama_model_path: str | Path, model: str) -> str:
    """The backbone folder's own tokenizer (Hugging Face folders have one), else Meta's shared
    ``<llama_model_path>/tokenizer.model``."""
    for folder in (Path(llama_model_path) / model, Path(model)):
        for name in ("tokenizer.model", "tokenizer.json"):
            if (folder / name).is_file():
                return str(folder / name)
    return str(Path(llama_model_path) / "tokenizer.model")


def run_tokenizer(args: argparse.Namespace) -> Tokenizer:
    """The tokenizer of the run's backbone; sets ``args.tokenizer_path`` to the file used (the
    checkpoint's args record it)."""
    derived = args.tokenizer_path is None
    if derived:
        args.tokenizer_path = default_tokenizer_path(args.llama_model_path, args.model)
    if not Path(args.tokenizer_path).exists() and args.model.count("/") == 1:
        args.tokenizer_path = default_tokenizer_path(backbone_folder(args), "")  # a hub id's files
    if derived and not Path(args.tokenizer_path).exists():
        raise FlipVQAError(f"{args.tokenizer_path}: tokenizer file not found (looked for by --llama_model_path "
                           f"{args.llama_model_path} and --model {args.model}: pass the folder that holds your "
                           f"backbone with those two flags, or --model <a backbone folder or hub id>, or "
                           f"--tokenizer_path <file>)")
    return load_tokenizer(args.tokenizer_path)


# ---------------------------------------------------------------------------- the backbone
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


def build_backbone(folder: str | Path, device: torch.device, dtype: torch.dtype | None = None,
                   quantize: Optional[str] = None, stage_on_cpu: bool = False) -> Transformer:
    """The frozen backbone on ``device``: float32 on CPU, the checkpoint's dtype elsewhere.

    With ``quantize`` (:mod:`flipvqa.quantize`) the weights are put together on the CPU and each
    block reaches ``device`` quantized. With ``stage_on_cpu`` (``--fsdp``) they stay on the CPU,
    in the dtype chosen for ``device``: :func:`flipvqa.parallel.shard_backbone` moves each
    block's shard. Either way no GPU holds the whole backbone in full precision."""
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
    load_on = torch.device("cpu") if quantize or stage_on_cpu else device
    model.load_state_dict({k: v.to(device=load_on, dtype=dtype) for k, v in state.items()},
                          strict=False, assign=True)
    del state
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_frequencies(args).to(load_on)  # a buffer, built on the meta device above
    if quantize:
        quantize_backbone(model, quantize, device)
    return model


def random_backbone(shape: ModelArgs, vocab_size: int, device: torch.device, dtype: torch.dtype,
                    seed: int) -> Transformer:
    """A backbone of ``shape`` with ``vocab_size`` words and random weights (for benchmarks),
    initialised (seeded) directly on ``device`` in ``dtype``: a 7B model never exists in float32."""
    shape = dataclasses.replace(shape, vocab_size=vocab_size)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(shape)
    finally:
        torch.set_default_dtype(default)
    model.inv_freq = rope_frequencies(shape).to(device)
    return model


# ---------------------------------------------------------------------------- the whole model
def build_model(args: argparse.Namespace, device: torch.device, tokenizer: Tokenizer,
                feature_dim: Optional[int] = None) -> FlippedVQA:
    """Backbone (frozen) + Flipped-VQA parts (float32) on ``device``."""
    dtype = DTYPES[args.dtype] if args.dtype else None
    if dtype is not None and device.type == "cpu" and dtype != torch.float32:
        log.warning("--dtype %s on CPU is slow; float32 is the default there", args.dtype)
    folder = backbone_folder(args)
    backbone = build_backbone(folder, device, dtype, quantize=args.quantize, stage_on_cpu=args.fsdp)
    check_window(backbone.args, args, folder)
    if tokenizer.n_words > backbone.args.vocab_size:
        raise FlipVQAError(f"{args.tokenizer_path}: {tokenizer.n_words} tokens, more than the backbone's "
                           f"vocabulary of {backbone.args.vocab_size}")
    return wrap_backbone(backbone, args, device, feature_dim)


def check_window(shape: ModelArgs, args: argparse.Namespace, folder: str | Path) -> None:
    """The backbone computes full causal attention, which equals a sliding-window layer's only while
    the whole sequence fits in the window: a longer run is refused rather than silently changed."""
    longest = args.max_seq_len + (getattr(args, "max_new_tokens", None) or 0)
    if shape.sliding_window is not None and longest > shape.sliding_window:
        raise FlipVQAError(f"{Path(folder) / 'config.json'}: sliding-window attention over {shape.sliding_window} "
                           f"tokens would be active at --max_seq_len {args.max_seq_len} + --max_new_tokens "
                           f"{getattr(args, 'max_new_tokens', None) or 0} (flipvqa computes full attention); "
                           f"lower them to {shape.sliding_window} tokens in all")


def wrap_backbone(backbone: Transformer, args: argparse.Namespace, device: torch.device,
                  feature_dim: Optional[int] = None) -> FlippedVQA:
    """The Flipped-VQA parts (float32) around a frozen backbone, as the run options say."""
    adapter_layer = args.adapter_layer or backbone.args.n_layers
    if adapter_layer > backbone.args.n_layers:
        raise FlipVQAError(f"--adapter_layer {adapter_layer} is larger than the backbone's "
                           f"{backbone.args.n_layers} layers")
    cfg = FlipConfig(adapter_len=args.adapter_len, adapter_layer=adapter_layer, max_feats=args.max_feats,
                     bias=args.bias, tau=args.tau, vaq=args.vaq, qav=args.qav,
                     skip_unadapted_layers=args.skip_unadapted_layers)
    if feature_dim is not None:
        cfg.feature_dim = feature_dim
    model = FlippedVQA(backbone, cfg)
    for _, p in model.trainable_parameters():
        p.data = p.data.to(device=device, dtype=torch.float32)
    model.grad_checkpointing = args.grad_checkpointing
    if args.compile:
        for layer in model.backbone.layers:
            layer.compile(dynamic=True)  # sequence lengths vary from batch to batch
    return model


__all__ = ["backbone_folder", "build_backbone", "build_model", "check_weights", "default_tokenizer_path",
           "load_checkpoint", "load_trainable", "random_backbone", "read_backbone", "run_tokenizer",
           "save_checkpoint", "wrap_backbone"]
