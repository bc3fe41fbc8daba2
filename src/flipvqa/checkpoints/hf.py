"""Hugging Face backbones: ``config.json`` + safetensors (Llama 1/2/3, Mistral, TinyLlama, Vicuna).

:func:`load_hf` turns a folder written by ``transformers`` into Meta's parameter names and
Meta's interleaved-pair rotary layout, so that :class:`flipvqa.model.llama.Transformer` needs one
layout only. :func:`resolve_backbone` turns a hub id into such a folder.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import torch
from torch import Tensor

from ..errors import FlipVQAError
from ..io import first_line, load_tensors, read_json_object
from ..model.llama import ModelArgs, Transformer

log = logging.getLogger(__name__)

# HF name -> Meta name; ``{}`` is the layer index.
NAME_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
SUPPORTED_TYPES = ("llama", "mistral")
# Families that share the file layout but compute something the backbone does not.
_UNSUPPORTED_WHY = {
    "qwen2": "its q/k/v projections have biases",
    "qwen3": "it normalises q and k per head",
    "gemma": "it scales embeddings and uses (1 + weight) norms and GeLU",
    "gemma2": "it soft-caps logits and alternates sliding-window layers",
    "phi3": "its q/k/v and gate/up projections are fused",
    "mixtral": "it is a mixture of experts",
}
_SKIPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old files stored it
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model"]


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)``; transformers >= 5 writes both under ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta", 10000.0)
    if isinstance(params, dict):
        theta, scaling = params.get("rope_theta", theta), params
    else:
        scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return float(theta), None
    needed = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind not in needed:
        raise FlipVQAError(f"{path}: rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    missing = [k for k in needed[kind] if scaling.get(k) is None]
    if missing:
        raise FlipVQAError(f"{path}: {kind} rope scaling needs {', '.join(missing)}")
    return float(theta), {"rope_type": kind, **{k: scaling[k] for k in needed[kind]}}


def hf_model_args(folder: str | Path) -> ModelArgs:
    """:class:`ModelArgs` from ``folder/config.json``; anything the backbone cannot compute
    exactly is a :class:`FlipVQAError` naming the file."""
    path = Path(folder) / "config.json"
    cfg = read_json_object(path)
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_TYPES:
        why = f" ({_UNSUPPORTED_WHY[kind]})" if kind in _UNSUPPORTED_WHY else ""
        raise FlipVQAError(f"{path}: model_type {kind!r} is not supported{why}; "
                           f"supported: {', '.join(SUPPORTED_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise FlipVQAError(f"{path}: {flag}=true is not supported (the backbone has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise FlipVQAError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise FlipVQAError(f"{path}: missing '{key}'")
        return cfg[key]

    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    theta, scaling = _rope(cfg, path)
    # Mistral's sliding_window (4096) is ignored: Flipped-VQA sequences are far shorter, and
    # within the window sliding-window attention is ordinary causal attention.
    return ModelArgs(
        dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or dim // n_heads,
        vocab_size=need("vocab_size"), hidden_dim=need("intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo the conversion script's q/k row permutation.

    HF stores each head's rows as ``[pair 0 first halves..., pair 0 second halves...]`` for its
    rotate-half rotary; Meta's interleaved rotary wants rows ``(2i, 2i+1)`` side by side."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _weight_files(folder: Path) -> list[Path]:
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json_object(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FlipVQAError(f"{path}: no 'weight_map'")
        shards = [folder / f for f in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise FlipVQAError(f"{shard}: weight shard listed in {path.name} not found")
        return shards
    raise FlipVQAError(f"{folder}: no weights (expected one of {', '.join(_WEIGHT_FILES)})")


def _open_weights(folder: Path) -> Iterator[tuple[Path, list[str], Callable[[str], Tensor]]]:
    """Per weight file: its path, tensor names and a getter. Safetensors are memory-mapped, so
    only the tensors read (one at a time) are materialised."""
    for path in _weight_files(folder):
        log.info("loading %s", path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise FlipVQAError(f"{path}: cannot read safetensors ({exc})") from None
            with handle as f:
                yield path, list(f.keys()), f.get_tensor
        else:
            state = load_tensors(path, "PyTorch weights")
            if not isinstance(state, dict):
                raise FlipVQAError(f"{path}: expected a dict of tensors")
            yield path, list(state), state.__getitem__
            del state


def load_hf(folder: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Arguments and weights of a Hugging Face folder, in Meta names and interleaved rotary.

    Tensors keep the file's dtype. With tied embeddings ``output.weight`` is left out (and
    ``args.tie_embeddings`` is set): :func:`flipvqa.checkpoints.build_backbone` ties it."""
    folder = Path(folder)
    args = hf_model_args(folder)
    names = {hf.format(i): meta.format(i) for hf, meta in NAME_MAP.items()
             for i in (range(args.n_layers) if "{}" in hf else [0])}
    if args.tie_embeddings:
        names.pop("lm_head.weight")
    with torch.device("meta"):  # exact shapes at no memory cost
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads}
    state: dict[str, Tensor] = {}
    for path, keys, get in _open_weights(folder):
        for name in keys:
            if _SKIPPED.fullmatch(name) or (args.tie_embeddings and name == "lm_head.weight"):
                continue  # an untied copy of a tied head is the embedding again: not read
            meta = names.get(name)
            if meta is None:
                raise FlipVQAError(f"{path}: unexpected weight {name!r} for a {args.n_layers}-layer "
                                   f"LLaMA-family model")
            if meta in state:
                raise FlipVQAError(f"{path}: weight {name!r} appears in more than one file")
            w = get(name)
            if w.shape != shapes[meta]:
                raise FlipVQAError(f"{path}: {name} has shape {tuple(w.shape)}, expected "
                                   f"{tuple(shapes[meta])} from config.json")
            kind = meta.split(".")[-2]
            state[meta] = _unpermute(w, heads[kind]) if kind in heads else w
    missing = [hf for hf, meta in names.items() if meta not in state]
    if missing:
        raise FlipVQAError(f"{folder}: weight {missing[0]!r} is missing from the weight files"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return args, state


# ---------------------------------------------------------------------------- hub ids

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that a machine without network fails in seconds instead of waiting
    out the hub client's timeouts. Behind a proxy the probe says nothing; the client decides."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_backbone(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder as is; otherwise a hub id (``meta-llama/Llama-3.2-1B``) downloaded with
    ``huggingface_hub`` (config, tokenizer files and ``model*.safetensors`` only: Mistral repos
    also hold a second copy of the weights in ``consolidated.safetensors``).

    Offline (``HF_HUB_OFFLINE=1`` or hub unreachable) only the local hub cache is used; if the
    model is not there this fails at once with a :class:`FlipVQAError`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not _HUB_ID.fullmatch(name) or name.startswith((".", "/", "~")):
        raise FlipVQAError(f"{name}: backbone folder not found")
    local_hint = "pass a local folder with config.json and the weights instead"
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError  # also in hub < 0.23
    except ImportError:
        raise FlipVQAError(f"{name}: not a local folder, and huggingface_hub is not installed to "
                           f"download it (pip install huggingface_hub); or {local_hint}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") \
        or constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    try:
        return Path(huggingface_hub.snapshot_download(
            name, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir, local_files_only=offline,
            etag_timeout=10))
    except GatedRepoError:
        raise FlipVQAError(f"{name}: gated model; accept its licence on huggingface.co and log in "
                           f"(hf auth login or HF_TOKEN), or {local_hint}") from None
    except RepositoryNotFoundError:
        raise FlipVQAError(f"{name}: no such model on the Hugging Face hub (or it is private); "
                           f"{local_hint}") from None
    except Exception as exc:  # offline with an empty cache, network errors, bad revisions...
        where = ("offline (HF_HUB_OFFLINE or no network) and not in the local hub cache" if offline
                 else f"download failed ({type(exc).__name__}: {first_line(exc)})")
        raise FlipVQAError(f"{name}: {where}; {local_hint}") from None
