"""Hugging Face backbones: tiny random models written by ``transformers`` load into the Meta-layout
backbone and give the same logits; GQA works with the Flipped-VQA adapter; bad folders fail clearly."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from flipvqa.checkpoints import build_backbone, read_backbone  # noqa: E402
from flipvqa.checkpoints import hf as hf_module  # noqa: E402
from flipvqa.checkpoints.hf import hf_model_args, resolve_backbone  # noqa: E402
from flipvqa.data.dataset import Batch, TaskBatch  # noqa: E402
from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.model.flipped import FlipConfig, FlippedVQA  # noqa: E402
from flipvqa.model.llama import ModelArgs, rope_frequencies  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=64)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # small, so the scaling changes frequencies
CASES = {
    "llama-mha": ("llama", {}),
    "llama3-gqa": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=2)),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "linear-rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "head-dim-mqa": ("llama", dict(head_dim=8, num_key_value_heads=1)),  # head_dim != hidden / heads
}
SEQ = 24


def _hf_model(kind: str, overrides: dict, seed: int = 0) -> torch.nn.Module:
    config_cls = transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig
    model_cls = transformers.MistralForCausalLM if kind == "mistral" else transformers.LlamaForCausalLM
    model = model_cls._from_config(config_cls(**BASE, **overrides), attn_implementation="eager",
                                   dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger-than-default random weights, norms away from 1: every piece shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for name, (kind, overrides) in CASES.items():
        model = _hf_model(kind, overrides)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, folder)
    model, _ = out["llama3-gqa"]
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    out["sharded"] = (model, sharded)
    return out


def _tokens(vocab: int, n: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", [*CASES, "sharded"])
def test_logits_match_transformers(saved, name):
    hf, folder = saved[name]
    backbone = build_backbone(folder, torch.device("cpu"))
    tokens = _tokens(BASE["vocab_size"])
    with torch.no_grad():
        ours, theirs = backbone(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if name == "tied":
        assert backbone.args.tie_embeddings and backbone.output.weight is backbone.tok_embeddings.weight
    if name == "mistral-gqa":
        assert backbone.args.n_kv_heads == 2


def test_rope_frequencies_follow_transformers(saved):
    hf, folder = saved["llama3-gqa"]
    args = hf_model_args(folder)
    assert args.rope_scaling["rope_type"] == "llama3" and args.rope_theta == 500000.0
    ours = rope_frequencies(args)
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq.float(), atol=1e-7, rtol=1e-6)
    plain = rope_frequencies(ModelArgs(**{**args.__dict__, "rope_scaling": None}))
    assert not torch.allclose(ours, plain)  # the case really exercises the scaling


def test_sharded_and_pytorch_bin_equal_single_file(saved, tmp_path):
    hf, folder = saved["llama3-gqa"]
    sharded = saved["sharded"][1]
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    _, ref = read_backbone(folder)
    for other in (sharded, tmp_path):
        _, state = read_backbone(other)
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_old_style_rope_config_reads_the_same(saved, tmp_path):
    """transformers < 5 wrote ``rope_theta`` and ``rope_scaling`` (with ``type``) at the top level."""
    _, folder = saved["llama3-gqa"]
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert hf_model_args(tmp_path) == hf_model_args(folder)


def _folder_with(tmp_path: Path, src: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    if config is not None:
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg.update(config)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("config, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "needs low_freq_factor"),
    ({"model_type": "qwen3_moe"}, "'qwen3_moe' is not supported (it is a mixture of experts)"),
    ({"model_type": "gpt2"}, "'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"intermediate_size": 100}, "down_proj.weight has shape (64, 96), expected (64, 100) from config.json"),
])
def test_bad_config_is_a_clear_error(saved, tmp_path, config, message):
    folder = _folder_with(tmp_path, saved["llama-mha"][1], config=config)
    with pytest.raises(FlipVQAError, match="config.json|model.safetensors") as err:
        read_backbone(folder)
    assert message in str(err.value)


def test_unexpected_and_missing_weights_are_named(saved, tmp_path):
    _, src = saved["llama-mha"]
    ref = safetensors_torch.load_file(src / "model.safetensors")
    extra = {**ref, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    folder = _folder_with(tmp_path / "extra", src, tensors=extra)
    with pytest.raises(FlipVQAError, match=r"model\.safetensors: unexpected weight 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        read_backbone(folder)
    beyond = {**ref, "model.layers.2.mlp.up_proj.weight": ref["model.layers.0.mlp.up_proj.weight"].clone()}
    with pytest.raises(FlipVQAError, match="unexpected weight 'model.layers.2.mlp.up_proj.weight'"):
        read_backbone(_folder_with(tmp_path / "beyond", src, tensors=beyond))
    fewer = {k: v for k, v in ref.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(FlipVQAError, match="weight 'model.layers.1.mlp.up_proj.weight' is missing"):
        read_backbone(_folder_with(tmp_path / "fewer", src, tensors=fewer))
    empty = _folder_with(tmp_path / "empty", src)
    (empty / "model.safetensors").unlink()
    with pytest.raises(FlipVQAError, match="no weights"):
        read_backbone(empty)


def test_resolve_backbone_local_and_offline(saved, tmp_path, monkeypatch):
    _, folder = saved["llama-mha"]
    assert resolve_backbone(folder) == folder and resolve_backbone(str(folder)) == folder
    with pytest.raises(FlipVQAError, match="backbone folder not found"):
        resolve_backbone(tmp_path / "no-such-folder")
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(FlipVQAError, match="pass a local folder"):
        resolve_backbone("flipvqa-test/no-such-model", cache_dir=tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf_module, "hub_reachable", lambda endpoint: False)  # no network at all
    with pytest.raises(FlipVQAError, match="offline .* pass a local folder"):
        resolve_backbone("flipvqa-test/no-such-model", cache_dir=tmp_path)
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------ GQA with the adapter

def _naive_hidden(model: FlippedVQA, tb: TaskBatch, h: torch.Tensor, video_bias: bool) -> torch.Tensor:
    """Flipped-VQA's layers written out per sequence and per query head (Meta's complex rotary)."""
    bb, cfg = model.backbone, model.cfg
    a = bb.args
    n_rep, hd, seq = a.n_heads // a.n_kv_heads, a.head_dim, h.shape[1]
    angles = torch.outer(torch.arange(seq).float(), bb.inv_freq)
    rot = torch.polar(torch.ones_like(angles), angles)  # (seq, hd/2)

    def rope(x):  # (seq, hd): interleaved pairs as complex numbers
        return torch.view_as_real(torch.view_as_complex(x.reshape(seq, hd // 2, 2)) * rot).reshape(seq, hd)

    first = a.n_layers - cfg.adapter_layer
    prompts = model.adapter_query.weight.view(cfg.adapter_layer, cfg.adapter_len, a.dim)
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    out = []
    for b in range(h.shape[0]):
        x = h[b]
        vs = int(tb.video_start[b])
        for j, layer in enumerate(bb.layers):
            att, adapted = layer.attention, j >= first
            xn = layer.attention_norm(x)
            q, k, v = (w(xn).view(seq, -1, hd) for w in (att.wq, att.wk, att.wv))
            heads = []
            for head in range(a.n_heads):
                g = head // n_rep  # the kv head this query head shares
                qh = rope(q[:, head])
                scores = qh @ rope(k[:, g]).T / math.sqrt(hd) + causal
                gates = model.layers[j]["attention"]
                if adapted and video_bias:
                    scores[vs + cfg.max_feats:, vs:vs + cfg.max_feats] += gates.gate2[0, head, 0, 0]
                o = F.softmax(scores, -1) @ v[:, g]
                if adapted:
                    p = prompts[j - first]
                    pk = att.wk(p).view(cfg.adapter_len, -1, hd)[:, g]  # the layer's own (small) wk/wv
                    pv = att.wv(p).view(cfg.adapter_len, -1, hd)[:, g]
                    o = o + torch.tanh(gates.gate1[0, head, 0, 0]) * F.softmax(qh @ pk.T / math.sqrt(hd), -1) @ pv
                heads.append(o)
            x = x + att.wo(torch.cat(heads, -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        out.append(x)
    return torch.stack(out)


def test_gqa_adapter_matches_naive_per_head(saved):
    backbone = build_backbone(saved["llama3-gqa"][1], torch.device("cpu"))
    assert backbone.args.n_kv_heads * 2 == backbone.args.n_heads
    cfg = FlipConfig(adapter_len=3, adapter_layer=backbone.args.n_layers, max_feats=4, vaq=True, qav=True)
    torch.manual_seed(0)
    model = FlippedVQA(backbone, cfg)
    with torch.no_grad():  # non-zero gates: a zero gate1 would hide any adapter bug
        for layer in model.layers:
            layer["attention"].gate1.copy_(torch.randn(1, 4, 1, 1))
            layer["attention"].gate2.copy_(torch.randn(1, 4, 1, 1))
        model.adapter_query.weight.normal_()
    ids = _tokens(BASE["vocab_size"], n=2, seq=14)
    tb = TaskBatch(ids, label_start=torch.tensor([9, 10]), length=torch.tensor([14, 13]),
                   video_start=torch.tensor([1, 2]))
    frames = torch.randn(2, cfg.max_feats, backbone.args.dim)
    h = model.embed(tb, frames)
    with torch.no_grad():
        for video_bias in (True, False):
            torch.testing.assert_close(model.hidden(tb, h, video_bias), _naive_hidden(model, tb, h, video_bias),
                                       atol=1e-5, rtol=1e-5)
    batch = Batch(video=torch.randn(2, cfg.max_feats, 768), tasks={"vqa": tb, "vaq": tb, "qav": tb},
                  answer=torch.tensor([0, 1]), qtype=torch.tensor([0, 0]))
    losses = model(batch)
    sum(losses).backward()
    assert all(torch.isfinite(x) for x in losses)
    assert all(model.layers[j]["attention"].gate1.grad.abs().sum() > 0 for j in range(2))
