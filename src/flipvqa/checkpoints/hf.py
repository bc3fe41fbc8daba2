"""Hugging Face backbones: ``config.json`` + safetensors (Llama 1/2/3, Mistral, TinyLlama, Vicuna,
Qwen2/2.5, Qwen3).

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
# Qwen2's q/k/v biases and Qwen3's per-head q/k norms (read only where the family has them).
BIAS_NAMES = {f"model.layers.{{}}.self_attn.{p}_proj.bias": f"layers.{{}}.attention.w{p}.bias" for p in "qkv"}
QK_NORM_NAMES = {f"model.layers.{{}}.self_attn.{p}_norm.weight": f"layers.{{}}.attention.{p}_norm.weight"
                 for p in "qk"}
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Families that share the file layout but compute something the backbone does not.
_UNSUPPORTED_WHY = {
    "qwen2_moe": "it is a mixture of experts",
    "qwen3_moe": "it is a mixture of experts",
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
            raise FlipVQAError(f"{path}: {flag}=true is not supported (only Qwen2's q/k/v biases are)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise FlipVQAError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")

    def need(key: str, why: str = "") -> Any:
        value = cfg.get(key)
        if value is None:
            raise FlipVQAError(f"{path}: missing '{key}'{why}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FlipVQAError(f"{path}: '{key}' must be a positive integer, not {value!r}")
        return value

    dim, n_heads, n_layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    n_kv_heads = need("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else n_heads
    # Qwen3 gives head_dim and heads * head_dim may differ from hidden_size; transformers' default
    # for a Qwen3 file without it (128) is not hidden / heads, so it is not guessed.
    head_dim = (need("head_dim", " (Qwen3 gives it; heads * head_dim need not be hidden_size)")
                if kind == "qwen3" else cfg.get("head_dim") or dim // n_heads)
    if head_dim % 2 or n_heads % n_kv_heads:
        raise FlipVQAError(f"{path}: head_dim {head_dim} must be even and num_attention_heads {n_heads} a "
                           f"multiple of num_key_value_heads {n_kv_heads}")
    theta, scaling = _rope(cfg, path)
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        vocab_size=need("vocab_size"), hidden_dim=need("intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3", sliding_window=_sliding_window(cfg, kind, n_layers))


def _sliding_window(cfg: dict, kind: str, n_layers: int) -> int | None:
    """The attention window of the layers that have one, as ``transformers`` reads the file: every
    Mistral layer (4096 when the key is absent); Qwen layers only with ``use_sliding_window``, those
    ``layer_types`` marks (else from ``max_window_layers`` on). None: all layers attend to all."""
    if kind == "mistral":
        return cfg.get("sliding_window", 4096)
    if kind not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return None
    types = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full"
                                       for i in range(n_layers)]
    return cfg["sliding_window"] if "sliding_attention" in types else None


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo the conversion script's q/k row permutation (of a weight, a bias or a per-head norm).

    HF stores each head's rows as ``[pair 0 first halves..., pair 0 second halves...]`` for its
    rotate-half rotary; Meta's interleaved rotary wants rows ``(2i, 2i+1)`` side by side. A bias
    or a q/k norm weight lives in the same rows, so it is reordered the same way."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


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
    name_map = {**NAME_MAP, **(BIAS_NAMES if args.qkv_bias else {}), **(QK_NORM_NAMES if args.qk_norm else {})}
    names = {hf.format(i): meta.format(i) for hf, meta in name_map.items()
             for i in (range(args.n_layers) if "{}" in hf else [0])}
    if args.tie_embeddings:
        names.pop("lm_head.weight")
    with torch.device("meta"):  # exact shapes at no memory cost
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads, "q_norm": 1, "k_norm": 1}
    state: dict[str, Tensor] = {}
    for path, keys, get in _open_weights(folder):
        for name in keys:
            if _SKIPPED.fullmatch(name) or (args.tie_embeddings and name == "lm_head.weight"):
                continue  # an untied copy of a tied head is the embedding again: not read
            meta = names.get(name)
            if meta is None:
                raise FlipVQAError(f"{path}: unexpected weight {name!r} for a {args.n_layers}-layer "
                                   f"{_family(args)} model")
            if meta in state:
                raise FlipVQAError(f"{path}: weight {name!r} appears in more than one file")
            w = get(name)
            if w.shape != shapes[meta]:
                raise FlipVQAError(f"{path}: {name} has shape {tuple(w.shape)}, expected "
                                   f"{tuple(shapes[meta])} from config.json{_shape_hint(meta, args)}")
            kind = meta.split(".")[-2]
            state[meta] = _unpermute(w, heads[kind]) if kind in heads else w
    missing = [hf for hf, meta in names.items() if meta not in state]
    if missing:
        raise FlipVQAError(f"{folder}: weight {missing[0]!r} is missing from the weight files"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return args, state


def _family(args: ModelArgs) -> str:
    return "Qwen2" if args.qkv_bias else "Qwen3" if args.qk_norm else "LLaMA-family"


def _shape_hint(meta: str, args: ModelArgs) -> str:
    """Where an attention weight's expected shape comes from, when head_dim is the likely culprit."""
    if ".attention." not in meta:
        return ""
    return (f" (num_attention_heads {args.n_heads}, num_key_value_heads {args.n_kv_heads}, "
            f"head_dim {args.head_dim}: does head_dim fit the weights?)")


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
