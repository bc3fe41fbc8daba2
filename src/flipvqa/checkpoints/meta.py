"""Meta's LLaMA release format: ``params.json`` and ``consolidated.NN.pth`` model-parallel shards."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ..errors import FlipVQAError
from ..io import load_tensors, read_json_object
from ..model.llama import ModelArgs

log = logging.getLogger(__name__)

# Dimension along which model-parallel shards split a weight (None: replicated, take shard 0's).
_SHARD_DIM = {
    "tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None,
}


def _shard_dim(name: str):
    key = name.split(".", 2)[2] if name.startswith("layers.") else name
    if key not in _SHARD_DIM:
        return "unknown"
    return _SHARD_DIM[key]


def is_meta_folder(path: Path) -> bool:
    return (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


def load_meta(folder: Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Read ``params.json`` and merge the shards. Tensors keep the file's dtype."""
    params_path = folder / "params.json"
    params = read_json_object(params_path)
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise FlipVQAError(f"{folder}: no consolidated.*.pth weight files")
    loaded = []
    for path in shards:
        log.info("loading %s", path)
        shard = load_tensors(path, "LLaMA weights")
        if not isinstance(shard, dict):
            raise FlipVQAError(f"{path}: expected a dict of LLaMA weights")
        loaded.append(shard)
    if len(loaded) == 1:
        state = loaded[0]
    else:
        state = {}
        for name in loaded[0]:
            dim = _shard_dim(name)
            if dim == "unknown":
                raise FlipVQAError(f"{shards[0]}: unexpected weight {name!r} in a sharded checkpoint")
            state[name] = loaded[0][name] if dim is None else torch.cat([s[name] for s in loaded], dim=dim)
    state.pop("rope.freqs", None)  # stored by some releases; recomputed here
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise FlipVQAError(f"{params_path}: missing '{key}'")
    if "tok_embeddings.weight" not in state or "layers.0.feed_forward.w1.weight" not in state:
        raise FlipVQAError(f"{shards[0]}: not a LLaMA checkpoint (no tok_embeddings/feed_forward weights)")
    head_dim = params["dim"] // params["n_heads"]
    args = ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or state["layers.0.attention.wk.weight"].shape[0] // head_dim,
        vocab_size=state["tok_embeddings.weight"].shape[0],
        hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=({"rope_type": "llama3", **_META_LLAMA3_SCALING} if params.get("use_scaled_rope") else None))
    return args, state


# Meta's Llama 3.1 folders say only ``use_scaled_rope``; these are the values it implies.
_META_LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
