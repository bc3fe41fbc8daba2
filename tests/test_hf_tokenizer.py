"""``tokenizer.json`` tokenizers: character spans, BOS/EOS discovery, and prompts built with them
(label positions, options of different lengths, option scoring) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from flipvqa.data.dataset import TaskBatch, VQADataset, collate  # noqa: E402
from flipvqa.data.records import Record  # noqa: E402
from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.hf_tokenizer import HFTokenizer  # noqa: E402
from flipvqa.model.flipped import FlipConfig, FlippedVQA  # noqa: E402
from flipvqa.model.llama import ModelArgs, Transformer  # noqa: E402
from flipvqa.prompts import LETTERS, VIDEO_SLOT  # noqa: E402
from flipvqa.tokenizer import load_tokenizer  # noqa: E402

# "(A)"/"(B)" are frequent and merge into one token, "(C)".."(E)" never occur: option sequences
# then differ in length, as they do with real vocabularies.
CORPUS = ["Instruction: Predict the answer based on the video and question.\nVideo:\n"
          "Question: Why did the man open the door?\nChoices: \n(A) to leave the room\n"
          "(B) to let the dog in\nAnswer: The answer is (A)\n"] * 20 + ["The answer is (B)"] * 10
NON_ASCII = "Café — naïve 日本語 🙂\nThe answer is (C)"
MAX_FEATS = 4


def _train(kind: str) -> tokenizers.Tokenizer:
    if kind == "bytelevel":  # Llama 3's layout: split off words, then byte-level BPE, no dummy prefix
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(r" ?[^\s]+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        special, alphabet = ["<s>", "</s>"], pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-converted (Llama 2, Mistral, TinyLlama): "▁" dummy prefix, byte fallback
        tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        special, alphabet = ["<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)], []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _folder(path: Path, tok, side_files: dict[str, dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    for name, content in side_files.items():
        (path / name).write_text(json.dumps(content))
    return path


CONFIG = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}


KINDS = ("bytelevel", "metaspace")


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, HFTokenizer]:
    return {kind: HFTokenizer(_folder(tmp_path_factory.mktemp(kind), _train(kind),
                                      {"tokenizer_config.json": CONFIG}) / "tokenizer.json")
            for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_and_character_spans(toks, kind):
    tok = toks[kind]
    ids, spans = tok.encode_with_spans(NON_ASCII)
    assert ids == tok.encode(NON_ASCII) and len(spans) == len(ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert spans[0][0] == 0 and spans[-1][1] == len(NON_ASCII)
    covered = set()
    for token_id, (start, end) in zip(ids, spans):
        assert 0 <= start <= end <= len(NON_ASCII)
        covered.update(range(start, end))
        piece = _decode(tok, [token_id])
        if "\ufffd" not in piece and tok.tok.id_to_token(token_id) != "▁":  # whole characters
            assert NON_ASCII[start:end].strip() == piece.strip()
    assert covered == set(range(len(NON_ASCII)))  # every character, 🙂 and 日本語 included
    ends = [e for _, e in spans]
    assert ends == sorted(ends)


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids(toks, kind):
    tok = toks[kind]
    assert tok.bos_id == tok.tok.token_to_id("<s>") and tok.eos_id == tok.tok.token_to_id("</s>")
    assert tok.n_words == tok.tok.get_vocab_size(with_added_tokens=True)
    assert _decode(tok, [tok.newline_id]) == "\n" or tok.tok.id_to_token(tok.newline_id) == "<0x0A>"
    assert tok.encode("<s>") != [tok.bos_id]  # special tokens in text stay text


def test_bos_eos_sources(tmp_path):
    raw = _train("bytelevel")
    s, e = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    # ids from the model files: config.json's EOS, and generation stops at every id the generation
    # config lists as well
    t = HFTokenizer(_folder(tmp_path / "ids", raw, {"config.json": {"bos_token_id": s, "eos_token_id": e},
                                                    "generation_config.json": {"eos_token_id": [7, 9]}})
                    / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (s, e) and t.stop_ids == (e, 7, 9)
    t = HFTokenizer(_folder(tmp_path / "gen", raw, {"generation_config.json": {"eos_token_id": [e, 9]}})
                    / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (None, e)
    # a tokenizer_config.json without bos_token (transformers' PreTrainedTokenizerFast writes none):
    # no BOS, even though config.json carries a bos_token_id (as Qwen's does)
    t = HFTokenizer(_folder(tmp_path / "qwen", raw, {"tokenizer_config.json": {"eos_token": "</s>"},
                                                     "config.json": {"bos_token_id": s, "eos_token_id": 7}})
                    / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (None, e)
    # no file names BOS: none, and prompts start without it
    t = HFTokenizer(_folder(tmp_path / "nobos", raw, {"tokenizer_config.json": {"bos_token": None, "eos_token": "</s>"}})
                    / "tokenizer.json")
    assert t.bos_id is None and t.eos_id == e
    seqs = VQADataset([_record(0)], t, n_options=5, max_feats=MAX_FEATS, max_seq_len=256, sub=False,
                      train=True).encoded[0]
    for task, (seq,) in seqs.items():
        assert None not in seq.ids and _decode(t, seq.ids[:3]).startswith("Instr"), task
    # no side files: what the post-processor template adds (Llama 3's tokenizer.json adds BOS)
    templated = _train("bytelevel")
    templated.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", s), ("</s>", e)])
    t = HFTokenizer(_folder(tmp_path / "template", templated, {}) / "tokenizer.json")
    assert (t.bos_id, t.eos_id) == (s, e)
    with pytest.raises(FlipVQAError, match="no EOS token"):
        HFTokenizer(_folder(tmp_path / "noeos", raw, {}) / "tokenizer.json")
    with pytest.raises(FlipVQAError, match=r"tokenizer_config.json: bos_token '<\|begin_of_text\|>' is not in"):
        HFTokenizer(_folder(tmp_path / "bad", raw, {"tokenizer_config.json": {"bos_token": "<|begin_of_text|>"}})
                    / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path / "ids"), HFTokenizer)


# ------------------------------------------------------------------ prompts end to end

def _record(i: int) -> Record:
    options = ["to leave the room", "to let the dog in", "to look outside", "to close it", "to wave"]
    gen = torch.Generator().manual_seed(i)
    return Record(index=i, vid=f"v{i}", question="Why did the man open the door?", options=options,
                  answer=i % 5, frames=torch.randn(3 + i, 768, generator=gen))


def _decode(tok: HFTokenizer, ids: list[int]) -> str:
    # keep "special" tokens: the test's byte-fallback pieces are registered as special tokens
    return tok.tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("kind", KINDS)
def test_label_positions_point_at_the_targets(toks, kind):
    tok = toks[kind]
    data = VQADataset([_record(0), _record(1)], tok, n_options=5, max_feats=MAX_FEATS, max_seq_len=256,
                      sub=False, train=False)
    question = "Why did the man open the door?"
    for enc in data.encoded:
        lengths = set()
        for k in range(5):
            vqa, vaq, qav = enc["vqa"][k], enc["vaq"][k], enc["qav"][k]
            for seq in (vqa, vaq, qav):
                assert seq.ids[0] == tok.bos_id and seq.ids[-1] == tok.eos_id and not seq.truncated
            # VQA: the targets are the answer letter (a token straddling the space belongs to them)
            slots = slice(vqa.video_start, vqa.video_start + MAX_FEATS)
            assert vqa.ids[slots] == [VIDEO_SLOT] * MAX_FEATS and vqa.ids[slots.stop] == tok.newline_id
            assert _decode(tok, vqa.ids[vqa.label_start:-1]).strip() == LETTERS[k]
            assert _decode(tok, vqa.ids[slots.stop + 1:vqa.label_start]).rstrip().endswith("The answer is")
            # VAQ: the targets are the question after its "Question:" label
            assert _decode(tok, vaq.ids[vaq.label_start:-1]).strip() == question
            assert _decode(tok, vaq.ids[vaq.video_start + MAX_FEATS + 1:vaq.label_start]).endswith(
                f"{LETTERS[k]}\nQuestion:")
            # QAV: the targets are the video slots right before EOS
            assert qav.label_start == qav.video_start == len(qav.ids) - MAX_FEATS - 1
            assert qav.ids[qav.video_start:-1] == [VIDEO_SLOT] * MAX_FEATS
            assert _decode(tok, qav.ids[1:qav.video_start]).endswith(f"{LETTERS[k]}\nVideo:")
            lengths.add(len(vqa.ids))
        assert len(lengths) > 1  # "(A)" is one token, "(E)" several


def test_score_options_equals_one_option_at_a_time(toks):
    tok = toks["bytelevel"]  # its option sequences differ in length, so padding takes part
    data = VQADataset([_record(0), _record(1)], tok, n_options=5, max_feats=MAX_FEATS, max_seq_len=256,
                      sub=False, train=False, tasks=("vqa",))
    torch.manual_seed(0)
    backbone = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                     hidden_dim=48))
    model = FlippedVQA(backbone, FlipConfig(adapter_len=3, adapter_layer=2, max_feats=MAX_FEATS)).eval()
    with torch.no_grad():  # non-zero gates so that the adapter and the video bias take part
        for layer in model.layers:
            layer["attention"].gate1.normal_()
            layer["attention"].gate2.normal_()
    items = [data[i] for i in range(len(data))]
    scores = model.score_options(collate(items))
    assert scores.shape == (2, 5)
    with torch.no_grad():
        for i, item in enumerate(items):
            frames = model.project_video(item.video[None]) + model.temporal_emb.weight[None]
            for k, seq in enumerate(item.sequences["vqa"]):
                n = len(seq.ids)
                tb = TaskBatch(torch.tensor([seq.ids]), torch.tensor([seq.label_start]), torch.tensor([n]),
                               torch.tensor([seq.video_start]))
                h = model.hidden(tb, model.embed(tb, frames), video_bias=True)[0]
                logits = backbone.output(backbone.norm(h))
                targets = torch.tensor(seq.ids[seq.label_start:])
                expected = F.cross_entropy(logits[seq.label_start - 1:n - 1], targets)
                torch.testing.assert_close(scores[i, k], expected, atol=1e-5, rtol=1e-5)
