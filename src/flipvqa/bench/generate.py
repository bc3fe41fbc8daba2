"""``flipvqa bench --generate``: generated tokens per second of answers in words, three ways in one
run, on the same backbone and prompts:

* ``cached``: :func:`flipvqa.model.generate.generate` (the prompt once, then one token per step
  against the cached keys/values, the adaption prompt's included);
* ``naive``: the same generation recomputing every row's whole sequence at every step;
* ``transformers``: Hugging Face's ``generate`` with its key/value cache on the same backbone
  weights as a ``LlamaForCausalLM``, text only (no video, no adapter), prompts of the same lengths
  (left-padded, as transformers wants for batched generation).

Every row generates exactly ``--max_new_tokens`` tokens (no stop token), greedily, so the three do
the same number of steps. Prompts are synthetic NExT-QA-style questions asked without choices.
Each way runs ``--warmup`` untimed batches, then ``--steps`` timed ones; the figures are
``batch_size * max_new_tokens * steps / seconds``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Callable

import torch

from ..config import resolve
from ..data.dataset import VQADataset, collate
from ..demo.synthetic import random_records
from ..devices import autocast, init_distributed, seed_everything
from ..errors import FlipVQAError
from ..model.flipped import FlippedVQA
from ..model.generate import Sampling, generate
from ..model.inputs import Batch
from ..quiet import before_transformers_models
from .machine import device_name, timed

log = logging.getLogger(__name__)


def generate_bench(ns: argparse.Namespace, bench_model: Callable) -> dict:
    """Measure the three ways; returns the JSON-ready result (``bench_model`` builds the model as
    ``flipvqa bench`` does)."""
    args = resolve(ns)
    _, device = init_distributed(args.device)
    seed_everything(args.seed)
    model, tokenizer, source = bench_model(args, device)
    model.eval()
    batches = _prompt_batches(args, tokenizer, ns.warmup + ns.steps, device)
    sampling = Sampling(args.max_new_tokens, stop_ids=())  # every row runs to max_new_tokens
    dtype = model.backbone.tok_embeddings.weight.dtype
    amp = autocast(device, dtype)

    def ours(cache: bool) -> Callable[[Batch], None]:
        def step(batch: Batch) -> None:
            with amp:
                generate(model, batch.video, batch.tasks["prompt"], sampling, cache=cache)
        return step

    timings = {"cached": timed(ours(True), batches, ns.warmup, device),
               "naive": timed(ours(False), batches, ns.warmup, device)}
    hf = _hf_model(model, device, dtype)
    timings["transformers"] = timed(_hf_step(hf, args.max_new_tokens), batches, ns.warmup, device)
    tokens = args.batch_size * args.max_new_tokens * ns.steps
    rates = {f"{k}_tokens_per_s": tokens / s for k, s in timings.items()}
    shape = model.backbone.args
    lengths = [int(n) for b in batches for n in b.tasks["prompt"].length]
    return {
        "config": {"mode": "generate", "device": str(device), "device_name": device_name(device),
                   "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "model": args.model, "backbone": source, "dim": shape.dim,
                   "n_layers": shape.n_layers, "batch_size": args.batch_size,
                   "max_new_tokens": args.max_new_tokens, "prompt_tokens": [min(lengths), max(lengths)],
                   "steps": ns.steps, "warmup": ns.warmup},
        **rates,
        "speedup_vs_naive": rates["cached_tokens_per_s"] / rates["naive_tokens_per_s"],
        "ratio_vs_transformers": rates["cached_tokens_per_s"] / rates["transformers_tokens_per_s"],
    }


def _prompt_batches(args, tokenizer, n_batches: int, device: torch.device) -> list[Batch]:
    """Batches of generation prompts: synthetic NExT-QA-style questions without their choices."""
    records = random_records(args.batch_size * n_batches, args.seed)
    for rec in records:
        rec.options, rec.answer = [], None
    dataset = VQADataset(records, tokenizer, None, args.max_feats, args.max_seq_len, args.sub, train=False,
                         name="synthetic")
    return [collate([dataset[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
            .part("prompt").to(device) for b in range(n_batches)]


def _hf_model(model: FlippedVQA, device: torch.device, dtype: torch.dtype):
    """The backbone as a transformers ``LlamaForCausalLM`` with the same weights (q/k rows
    permuted back to the rotate-half layout transformers uses)."""
    before_transformers_models()
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise FlipVQAError("bench --generate compares with transformers: pip install transformers") from None
    a = model.backbone.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim, rms_norm_eps=a.norm_eps,
                         rope_theta=a.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa",
                         max_position_embeddings=4096)
    hf = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    state = model.backbone.state_dict()
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}
    for j in range(a.n_layers):
        p = f"layers.{j}."
        for ours, theirs in names.items():
            part = "attention" if ours in ("wq", "wk", "wv", "wo") else "feed_forward"
            w = state[f"{p}{part}.{ours}.weight"]
            if ours in ("wq", "wk"):
                w = _permute(w, a.n_heads if ours == "wq" else a.n_kv_heads)
            out[f"model.layers.{j}.{theirs}.weight"] = w
        out[f"model.layers.{j}.input_layernorm.weight"] = state[f"{p}attention_norm.weight"]
        out[f"model.layers.{j}.post_attention_layernorm.weight"] = state[f"{p}ffn_norm.weight"]
    hf.load_state_dict(out)
    return hf


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> transformers' rotate-half halves, per head."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_step(hf, max_new_tokens: int) -> Callable[[Batch], None]:
    def step(batch: Batch) -> None:
        tb = batch.tasks["prompt"]
        n, width = tb.ids.shape
        ids = torch.zeros_like(tb.ids)
        mask = torch.zeros_like(tb.ids)
        for r in range(n):  # left-pad: each prompt ends at the last column
            k = int(tb.length[r])
            ids[r, width - k:] = tb.ids[r, :k]
            mask[r, width - k:] = 1
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                        min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
    return step
