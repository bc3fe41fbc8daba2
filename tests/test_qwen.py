"""Qwen2 / Qwen2.5 and Qwen3 backbones (``model_type`` qwen2, qwen3): tiny random models written by
``transformers``, with a Qwen-style byte-level BPE tokenizer (no BOS, ``<|endoftext|>`` as EOS).

* The backbone's logits equal ``transformers``' (eager, float32).
* ``flipvqa eval`` scores equal an independent computation of the Flipped-VQA definition made from
  the ``transformers`` modules themselves (their rotate-half rotary, their q/k norms and biases): the
  adapter rows go through ``k_proj``/``v_proj`` with biases, then ``k_norm``, without rotary or the
  input norm; per-head gates; the video bias. Cases: tied embeddings, ``heads * head_dim != hidden``.
* Training, resume, open-ended generation and ``--quantize int8`` run on them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import rotate_half  # noqa: E402

from flipvqa import data  # noqa: E402
from flipvqa.checkpoints import build_backbone  # noqa: E402
from flipvqa.checkpoints.hf import hf_model_args  # noqa: E402
from flipvqa.cli import main  # noqa: E402
from flipvqa.data.dataset import VQADataset  # noqa: E402
from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.hf_tokenizer import HFTokenizer  # noqa: E402
from flipvqa.io import read_jsonl  # noqa: E402
from flipvqa.model.flipped import FlipConfig, FlippedVQA  # noqa: E402

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            vocab_size=448, rms_norm_eps=1e-6, max_position_embeddings=256)
CASES = {
    # Qwen2.5-0.5B's traits: q/k/v biases, GQA, tied embeddings, rope_theta 1e6
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen3-8B's: per-head q/k norms, untied, heads * head_dim (96) != hidden_size (64)
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=1e6)),
    # Qwen3-0.6B's: tied, heads * head_dim (128) != hidden_size
    "qwen3-tied": ("qwen3", dict(num_key_value_heads=4, head_dim=32, tie_word_embeddings=True)),
}
# Qwen2's pre-tokenizer split (single digits, a space glued to the following word or punctuation).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Instruction: Predict the answer based on the video and question.\nVideo:\nQuestion: What is the "
          "man doing?\nChoices:\n(A) cooking\n(B) running\nAnswer: The answer is (A)\n"] * 20
MAX_FEATS, WIDTH, ADAPTER_LEN = 4, 32, 3
QUESTIONS = [  # options of different token lengths, one non-ASCII
    ("v0", "What is the man doing?", ["cooking", "running in the park", "café au lait", "sleeping"], 1),
    ("v1", "Why did the dog bark?", ["it saw a cat", "hunger", "to greet the man", "no reason"], 0),
    ("v2", "What happens after the door opens?", ["a woman enters", "nothing", "the dog runs out", "rain"], 2),
]


def qwen_tokenizer(folder: Path) -> None:
    """A tiny tokenizer laid out like Qwen's: NFC, regex split then byte-level BPE, no BOS, and the
    files transformers writes for Qwen2Tokenizer (``bos_token`` null, EOS ``<|endoftext|>``)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "tokenizer_class": "Qwen2Tokenizer"}))


def _hf_model(kind: str, overrides: dict) -> torch.nn.Module:
    config_cls = transformers.Qwen2Config if kind == "qwen2" else transformers.Qwen3Config
    model_cls = transformers.Qwen2ForCausalLM if kind == "qwen2" else transformers.Qwen3ForCausalLM
    model = model_cls._from_config(config_cls(**BASE, **overrides), attn_implementation="eager",
                                   dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger-than-default weights and biases, norms away from 1: every piece shows
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
        qwen_tokenizer(folder)
        # Qwen3's chat models stop at <|im_end|> as well as at EOS
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(saved, name):
    hf, folder = saved[name]
    backbone = build_backbone(folder, torch.device("cpu"))
    args = backbone.args
    assert args.qkv_bias == (CASES[name][0] == "qwen2") and args.qk_norm == (CASES[name][0] == "qwen3")
    assert args.tie_embeddings == name.endswith("tied")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_has_no_bos_and_qwen_stops(saved):
    _, folder = saved["qwen3"]
    tok = HFTokenizer(folder / "tokenizer.json")
    assert tok.bos_id is None and tok.eos_id == tok.tok.token_to_id("<|endoftext|>") == 0
    assert set(tok.stop_ids) == {0, 2}  # EOS, and generation_config's <|im_end|>
    assert tok.decode([tok.newline_id]) == "\n"


# ---------------------------------------------------------------------------- eval vs the definition
def write_dataset(root: Path) -> Path:
    gen = torch.Generator().manual_seed(2)
    folder = root / "qw"
    folder.mkdir(parents=True)
    rows = [{"video": v, "question": q, "options": o, "answer": a} for v, q, o, a in QUESTIONS]
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    feats = {v: torch.randn(3 + i, WIDTH, generator=gen) for i, (v, *_) in enumerate(QUESTIONS)}
    torch.save(feats, folder / "features.pth")
    return root


def random_checkpoint(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """Every trainable part random and away from its initial value (a zero gate1 would hide the adapter)."""
    backbone = build_backbone(folder, torch.device("cpu"))
    cfg = FlipConfig(adapter_len=ADAPTER_LEN, adapter_layer=backbone.args.n_layers, max_feats=MAX_FEATS,
                     feature_dim=WIDTH)
    model = FlippedVQA(backbone, cfg)
    gen = torch.Generator().manual_seed(3)
    weights = {name: torch.randn(p.shape, generator=gen) * (0.3 if "visual_proj" in name else 1.0)
               for name, p in model.trainable_parameters()}
    torch.save({"model": weights}, path)
    return weights


def flags(folder: Path, root: Path) -> list[str]:
    return ["--model", str(folder), "--dataset", "qw", "--data_path", str(root), "--num_workers", "0",
            "--max_seq_len", "128", "--max_feats", str(MAX_FEATS), "--adapter_len", str(ADAPTER_LEN),
            "--batch_size", "2"]


def defined_score(hf, weights: dict, seq, frames: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one option's answer tokens, computed from the transformers modules."""
    m, cfg = hf.model, hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    ids, n, vs = torch.tensor(seq.ids), len(seq.ids), seq.video_start
    x = m.embed_tokens(ids).clone()
    x[vs:vs + MAX_FEATS] = frames @ weights["visual_proj.weight"].T + weights["temporal_emb.weight"]
    cos, sin = (t[0] for t in m.rotary_emb(x[None], torch.arange(n)[None]))

    def rope(t: torch.Tensor) -> torch.Tensor:  # (n, hd), transformers' rotate-half form
        return t * cos + rotate_half(t) * sin

    causal = torch.full((n, n), float("-inf")).triu(1)
    prompts = weights["adapter_query.weight"].view(cfg.num_hidden_layers, ADAPTER_LEN, -1)
    for j, layer in enumerate(m.layers):
        att = layer.self_attn
        qk_norm = hasattr(att, "q_norm")
        xn = layer.input_layernorm(x)
        q, k, v = (proj(xn).view(n, -1, hd) for proj in (att.q_proj, att.k_proj, att.v_proj))
        pk, pv = (proj(prompts[j]).view(ADAPTER_LEN, -1, hd) for proj in (att.k_proj, att.v_proj))
        if qk_norm:
            q, k, pk = att.q_norm(q), att.k_norm(k), att.k_norm(pk)
        gate1, gate2 = weights[f"layers.{j}.attention.gate1"], weights[f"layers.{j}.attention.gate2"]
        outs = []
        for h in range(heads):
            g = h // (heads // kv_heads)
            qh = rope(q[:, h])
            scores = qh @ rope(k[:, g]).T / math.sqrt(hd) + causal
            scores[vs + MAX_FEATS:, vs:vs + MAX_FEATS] += gate2[0, h, 0, 0]
            out = F.softmax(scores, -1) @ v[:, g]
            out = out + torch.tanh(gate1[0, h, 0, 0]) * F.softmax(qh @ pk[:, g].T / math.sqrt(hd), -1) @ pv[:, g]
            outs.append(out)
        x = x + att.o_proj(torch.cat(outs, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = hf.lm_head(m.norm(x))
    return F.cross_entropy(logits[seq.label_start - 1:n - 1], ids[seq.label_start:])


@pytest.mark.parametrize("name", CASES)
def test_eval_scores_follow_the_definition(saved, name, tmp_path):
    hf, folder = saved[name]
    root = write_dataset(tmp_path / "data")
    weights = random_checkpoint(folder, tmp_path / "ckpt.pth")
    out = tmp_path / "eval"
    assert main(["eval", *flags(folder, root), "--resume", str(tmp_path / "ckpt.pth"),
                 "--output_dir", str(out)]) == 0
    rows = {r["index"]: r for r in read_jsonl(out / "predictions_val.jsonl")}
    tok = HFTokenizer(folder / "tokenizer.json")
    records = data.load_split(root, "qw", "val")
    dataset = VQADataset(records, tok, n_options=4, max_feats=MAX_FEATS, max_seq_len=128, sub=False,
                         train=False, tasks=("vqa",))
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            for k, seq in enumerate(item.sequences["vqa"]):
                # section 6c: no BOS, the instruction first, EOS last
                assert tok.decode(seq.ids[:2]).startswith("Instruction") and seq.ids[-1] == tok.eos_id
                expected = defined_score(hf, weights, seq, item.video).item()
                assert rows[i]["scores"][k] == pytest.approx(expected, abs=1e-4), (i, k)
            assert rows[i]["prediction"] == min(range(4), key=rows[i]["scores"].__getitem__)


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3"])
def test_cached_generation_equals_recomputing(saved, name, tmp_path):
    """Open-ended answers: the KV-cached engine (adapter keys/values computed once, with Qwen2's
    biases and Qwen3's k_norm) gives what recomputing the whole sequence at every step gives."""
    from flipvqa.data.dataset import collate
    from flipvqa.model.generate import Sampling, generate

    _, folder = saved[name]
    weights = random_checkpoint(folder, tmp_path / "ckpt.pth")
    backbone = build_backbone(folder, torch.device("cpu"))
    model = FlippedVQA(backbone, FlipConfig(adapter_len=ADAPTER_LEN, adapter_layer=backbone.args.n_layers,
                                            max_feats=MAX_FEATS, feature_dim=WIDTH)).eval()
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    tok = HFTokenizer(folder / "tokenizer.json")
    records = data.load_split(write_dataset(tmp_path / "data"), "qw", "val")
    for rec in records:
        rec.answers, rec.options, rec.answer = [rec.options[rec.answer]], [], None
    ds = VQADataset(records, tok, None, MAX_FEATS, 128, False, train=False, tasks=("vqa",))
    part = collate([ds[i] for i in range(len(ds))]).part("prompt")
    sampling = Sampling(max_new_tokens=8, stop_ids=tok.stop_ids)
    with torch.no_grad():
        cached = generate(model, part.video, part.tasks["prompt"], sampling)
        recomputed = generate(model, part.video, part.tasks["prompt"], sampling, cache=False)
    assert cached.tokens == recomputed.tokens and any(cached.tokens)
    for p, q in zip(cached.probs, recomputed.probs):
        assert p == pytest.approx(q, abs=1e-4)


# ---------------------------------------------------------------------------- the other commands
def test_train_resume_generate_and_int8(saved, tmp_path, capsys):
    _, folder = saved["qwen3"]
    root = write_dataset(tmp_path / "data")
    run = tmp_path / "run"
    common = [*flags(folder, root), "--output_dir", str(run), "--warmup_epochs", "1", "--vaq", "--qav"]
    assert main(["train", *common, "--epochs", "1"]) == 0
    assert main(["train", *common, "--epochs", "2", "--resume", "auto"]) == 0
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1] and all(e["train_loss"] > 0 for e in log)
    ckpt = run / "checkpoint_last.pth"
    # open-ended questions on the same backbone: greedy generation, stopped by --max_new_tokens
    oe = tmp_path / "oe"
    shutil.copytree(root, oe)
    rows = [{"video": v, "question": q, "answer": o[a]} for v, q, o, a in QUESTIONS]
    (oe / "qw" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["eval", *flags(folder, oe), "--resume", str(ckpt), "--max_new_tokens", "4",
                 "--output_dir", str(tmp_path / "ev")]) == 0
    preds = read_jsonl(tmp_path / "ev" / "predictions_val.jsonl")
    assert len(preds) == 3 and all(isinstance(r["prediction"], str) for r in preds)
    pytest.importorskip("torchao")
    for quantize, where in (([], "full"), (["--quantize", "int8"], "q8")):
        assert main(["eval", *flags(folder, root), "--resume", str(ckpt), *quantize,
                     "--output_dir", str(tmp_path / where)]) == 0
    full, q8 = (read_jsonl(tmp_path / where / "predictions_val.jsonl") for where in ("full", "q8"))
    assert len(q8) == 3
    for a, b in zip(full, q8):  # int8 quantizes the biased q/k/v projections too
        assert a["scores"] == pytest.approx(b["scores"], abs=0.05) and a["scores"] != b["scores"]


# ---------------------------------------------------------------------------- bad folders
def _edited(tmp_path: Path, src: Path, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("name, changes, message", [
    ("qwen3", dict(head_dim=None), "config.json: missing 'head_dim' (Qwen3 gives it"),
    ("qwen2-tied", dict(hidden_size=None), "config.json: missing 'hidden_size'"),
    ("qwen3", dict(head_dim=16), "_norm.weight has shape (24,), expected (16,) from config.json (num_attention_heads 4, "
                                 "num_key_value_heads 2, head_dim 16: does head_dim fit the weights?)"),
    ("qwen3", dict(head_dim=15), "head_dim 15 must be even"),
    ("qwen2-tied", dict(model_type="qwen2_moe"), "'qwen2_moe' is not supported (it is a mixture of experts); "
                                                 "supported: llama, mistral, qwen2, qwen3"),
    ("qwen3", dict(attention_bias=True), "attention_bias=true is not supported"),
])
def test_bad_qwen_folders_are_one_line(saved, tmp_path, name, changes, message):
    folder = _edited(tmp_path, saved[name][1], **changes)
    with pytest.raises(FlipVQAError) as err:
        build_backbone(folder, torch.device("cpu"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sliding_window_active_at_the_run_length_is_refused(saved, tmp_path, capsys):
    _, src = saved["qwen2-tied"]
    folder = _edited(tmp_path, src, use_sliding_window=True, sliding_window=64, max_window_layers=1,
                     layer_types=None)
    assert hf_model_args(folder).sliding_window == 64
    inactive = _edited(tmp_path / "off", src, use_sliding_window=False, sliding_window=64)
    assert hf_model_args(inactive).sliding_window is None
    root = write_dataset(tmp_path / "data")
    code = main(["eval", *flags(folder, root), "--untrained", "--output_dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and "sliding-window attention over 64 tokens" in err and "--max_seq_len 128" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3"])
def test_fsdp_eval_scores_as_one_process(saved, name, tmp_path):
    """--fsdp on 2 gloo processes shards the Qwen blocks (biases and q/k norms included) and the
    tied embedding, and scores as one process does."""
    import os
    import subprocess
    import sys

    from conftest import TORCHRUN_PORT

    _, folder = saved[name]
    root = write_dataset(tmp_path / "data")
    random_checkpoint(folder, tmp_path / "ckpt.pth")
    argv = ["eval", *flags(folder, root), "--resume", str(tmp_path / "ckpt.pth"), "--batch_size", "1"]
    assert main([*argv, "--output_dir", str(tmp_path / "one")]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", *TORCHRUN_PORT(), "--nproc_per_node", "2",
                          "-m", "flipvqa", "-q", *argv, "--fsdp", "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "FLIPVQA_CRASH_AT"})
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (read_jsonl(tmp_path / d / "predictions_val.jsonl") for d in ("one", "two"))
    assert [r["index"] for r in two] == [0, 1, 2]
    for a, b in zip(one, two):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)
