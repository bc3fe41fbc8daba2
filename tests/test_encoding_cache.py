"""Encoded prompts in flat arrays and their on-disk cache: cached, freshly encoded and the former
Python-list encoding give the same items; a cache for other inputs or a damaged one is rebuilt
with a note; under torchrun only rank 0 encodes. The fast span encoder gives the former one's
tokens and character spans on tricky texts."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flipvqa.data import cache as cache_module
from flipvqa.data import dataset as dataset_module
from flipvqa.data.arrayfile import read_meta, write_arrays
from flipvqa.data.cache import CachePlace
from flipvqa.data.dataset import VQADataset, collate
from flipvqa.data.encoded import EncodedSplit, SplitBuilder
from flipvqa.data.records import Record
from flipvqa.devices import Dist
from flipvqa.prompts import Sequence
from flipvqa.tokenizer import load_tokenizer

from conftest import REF

LLAMA = REF / "llama" / "tokenizer.model"
DEMO = Path(__file__).parents[1] / "src" / "flipvqa" / "assets" / "demo" / "tokenizer.model"
MAX_FEATS = 4
PIECES = ["a", "the", " ", "  ", "\n", "\t", "é", "e\u0301", "日本語", "🙂", "👩\u200d👩\u200d👧", "\u00a0", "𝔘",
          "ß", "(A)", "?", "42", "Café", " naïve", "—", "\u2028", "Ω"]
TRICKY = ["", " ", "\n", "  leading spaces", "trailing \n", "Café — naïve 日本語 🙂\nThe answer is (C)",
          "a🙂b", " 𝔘 é\u0301", "\u00a0 a", "line\n\nbreaks\tand tabs", "👩\u200d👩\u200d👧 family", "東京 x",
          "Answer: The answer is (B)", "\u2028separator", "ünïcödé" * 20]


def random_texts(n: int, seed: int, longest: int = 30) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, longest))) for _ in range(n)]


def make_records(kind: str, answered: bool = True, n: int = 14) -> list[Record]:
    """Multiple-choice questions with 2 to 5 options ("mc"), every other one open-ended ("open"),
    or multiple-choice with dialogues, some long enough to be cut ("sub")."""
    texts = random_texts(6 * n, seed=len(kind), longest=6)
    records = []
    for i in range(n):
        question, options = f"Why {texts[6 * i]}?", [t or "x" for t in texts[6 * i + 1:6 * i + 3 + i % 4]]
        rec = Record(index=i, vid=f"v{i}", question=question, options=options,
                     answer=i % len(options) if answered else None, frames=torch.full((3, 8), float(i)))
        if kind == "open" and i % 2:
            rec.options, rec.answer, rec.answers = [], None, [texts[6 * i + 5] or "yes"] if answered else None
        if kind == "sub":
            rec.dialogue = f"Dialogue: {' '.join(texts[6 * i:6 * i + 6]) * (1 + 3 * (i % 3))}\n"
        records.append(rec)
    return records


def dataset(records, tok, train: bool, sub: bool = False, place=None, max_seq_len: int = 160, **kw):
    return VQADataset(records, tok, None, MAX_FEATS, max_seq_len, sub, train=train, cache=place,
                      feature_dim=8, **kw)


def place_in(folder: Path, label: str = "train-train") -> CachePlace:
    return CachePlace([folder], label)


def items_of(ds: VQADataset) -> list[dict[str, list[Sequence]]]:
    return [ds[i].sequences for i in range(len(ds))]


# ---------------------------------------------------------------------------- the same items
@pytest.mark.parametrize("kind", ["mc", "open", "sub"])
@pytest.mark.parametrize("train", [True, False])
def test_cached_and_fresh_items_are_identical(tmp_path, llama_tokenizer, kind, train):
    records = make_records(kind)
    sub = kind == "sub"
    plain = dataset(records, llama_tokenizer, train, sub)
    cold = dataset(records, llama_tokenizer, train, sub, place_in(tmp_path))
    warm = dataset(records, llama_tokenizer, train, sub, place_in(tmp_path))
    assert cold.encoding.path == warm.encoding.path and warm.encoding.path.parent == tmp_path
    assert items_of(plain) == items_of(cold) == items_of(warm)
    assert plain.n_truncated == cold.n_truncated == warm.n_truncated
    assert (plain.n_truncated > 0) == sub  # the long dialogues are cut
    if kind == "open":
        assert any("prompt" in s for s in items_of(plain)) != train
    a, b = collate([plain[i] for i in range(4)]), collate([warm[i] for i in range(4)])
    for task in a.tasks:
        assert all(torch.equal(x, y) for x, y in zip(vars(a.tasks[task]).values(), vars(b.tasks[task]).values()))
    assert [enc for enc in warm.encoded] == items_of(plain) and warm.encoded[-1] == plain[-1].sequences
    # a DataLoader worker started by spawn gets the cache file's name, and maps it again
    pickled = pickle.dumps(warm.encoding)
    assert len(pickled) < 500 and pickle.loads(pickled).sequences(1) == plain[1].sequences


def test_arrays_give_back_the_former_python_encoding(llama_tokenizer):
    """What the dataset held before (a list of encode_sample dicts) is what the arrays give back."""
    from flipvqa.prompts import encode_sample, open_prompt_text, prompt_text

    records = make_records("open", answered=False)
    ds = dataset(records, llama_tokenizer, train=False)
    for rec, item in zip(records, items_of(ds)):
        text = open_prompt_text(rec.question) if rec.open_ended else prompt_text(rec.question, rec.options)
        answer = "" if rec.open_ended else 0
        assert item == encode_sample(llama_tokenizer, text, answer, len(rec.options), MAX_FEATS, 160, False,
                                     ("vqa", "vaq", "qav"), all_options=True)


def test_wide_vocabularies_keep_four_byte_ids(tmp_path):
    builder = SplitBuilder(n_words=200_000)
    seqs = {"vqa": [Sequence([1, 150_000, 2], 1, 0), Sequence([7], 1, 0, truncated=True, full_length=9)]}
    builder.add(seqs)
    builder.add({"prompt": [Sequence([], 0, 0, lost_answer=True)]})
    split = builder.finish()
    assert split.ids.dtype == np.int32 and SplitBuilder(n_words=32_000).dtype == np.uint16
    write_arrays(tmp_path / "x.enc", split.arrays(), {})
    loaded = EncodedSplit.load(tmp_path / "x.enc")[1]
    assert [loaded.sequences(0), loaded.sequences(1)] == [seqs, {"prompt": [Sequence([], 0, 0, lost_answer=True)]}]
    assert loaded.n_truncated() == 1 and loaded.longest() == 9


# ---------------------------------------------------------------------------- rebuilt with a note
def test_other_options_tokenizer_or_data_rebuild_with_a_note(tmp_path, llama_tokenizer, caplog):
    records = make_records("mc")
    caplog.set_level(logging.INFO, logger="flipvqa.data.cache")
    first = dataset(records, llama_tokenizer, True, place=place_in(tmp_path)).encoding.path
    caplog.clear()
    longer = dataset(records, llama_tokenizer, True, place=place_in(tmp_path), max_seq_len=200)
    assert f"{first}: made for other options: max_seq_len 160 (now 200)" in caplog.text
    assert not first.exists() and longer.encoding.path.exists()  # replaced, not piled up
    second = longer.encoding.path

    caplog.clear()
    demo = load_tokenizer(DEMO)
    other_tok = dataset(records, demo, True, place=place_in(tmp_path), max_seq_len=200)
    assert f"{second}: made for another tokenizer" in caplog.text
    assert items_of(other_tok) == items_of(dataset(records, demo, True, max_seq_len=200))

    caplog.clear()
    records[3].question = "Why not?"
    third = other_tok.encoding.path
    changed = dataset(records, demo, True, place=place_in(tmp_path), max_seq_len=200)
    assert f"{third}: made for other questions" in caplog.text
    assert changed[3].sequences != other_tok[3].sequences
    assert sorted(p.name for p in tmp_path.glob("*.enc")) == [changed.encoding.path.name]


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "garbage"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, llama_tokenizer, caplog, damage):
    records = make_records("sub")
    path = dataset(records, llama_tokenizer, False, True, place_in(tmp_path, "val-eval")).encoding.path
    data, header = bytearray(path.read_bytes()), read_meta(path)[1]
    at = header["start"] + header["arrays"]["ids"]["offset"] + 3  # a token id
    data = {"truncated": data[:len(data) - 100], "garbage": b"not a cache at all",
            "flipped byte": data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]}[damage]
    path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="flipvqa.data.cache")
    again = dataset(records, llama_tokenizer, False, True, place_in(tmp_path, "val-eval"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == cache_module.__name__]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}: ") and "encoding the prompts again" in warnings[0]
    assert items_of(again) == items_of(dataset(records, llama_tokenizer, False, True))
    assert EncodedSplit.load(path)[1].path == path  # written anew


def test_read_only_data_folder_falls_back_to_the_output_folder(tmp_path, llama_tokenizer, monkeypatch, caplog):
    real = cache_module.write_arrays

    def refuse_data_folder(path, arrays, meta):
        if path.parent.name == "data":
            raise PermissionError(13, "Read-only file system")
        real(path, arrays, meta)

    monkeypatch.setattr(cache_module, "write_arrays", refuse_data_folder)
    records = make_records("mc")
    place = CachePlace([tmp_path / "data", tmp_path / "out"], "train-train")
    ds = dataset(records, llama_tokenizer, True, place=place)
    assert ds.encoding.path.parent == tmp_path / "out" and (tmp_path / "out" / ".gitignore").read_text().endswith("*\n")
    caplog.set_level(logging.INFO, logger="flipvqa.data.cache")
    nowhere = dataset(records, llama_tokenizer, True, place=CachePlace([tmp_path / "data"], "train-train"))
    assert nowhere.encoding.path is None and "cannot be cached" in caplog.text
    assert items_of(nowhere) == items_of(ds)


def test_checks_and_messages_are_the_same_from_the_cache(tmp_path, llama_tokenizer):
    from flipvqa.errors import FlipVQAError

    records = make_records("mc")
    errors = []
    for place in (None, place_in(tmp_path), place_in(tmp_path)):
        with pytest.raises(FlipVQAError) as err:
            dataset(records, llama_tokenizer, True, place=place, max_seq_len=30, name="x train")
        errors.append(str(err.value))
    assert errors[0] == errors[1] == errors[2] and "does not fit --max_seq_len 30" in errors[0]
    assert len(list(tmp_path.glob("*.enc"))) == 1  # the failing run's encoding is kept for the next


# ---------------------------------------------------------------------------- the fast span encoder
def former_sp_spans(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """SentencePieceTokenizer.encode_with_spans as it was: a per-character byte map."""
    proto = tok.sp.encode(text, out_type="proto")
    byte_to_char = []
    for i, ch in enumerate(text):
        byte_to_char.extend([i] * len(ch.encode("utf-8")))
    byte_to_char.append(len(text))
    return [p.id for p in proto.pieces], [(byte_to_char[p.begin], byte_to_char[p.end]) for p in proto.pieces]


@pytest.mark.parametrize("model", [LLAMA, DEMO], ids=["llama", "demo"])
def test_sentencepiece_spans_are_the_former_ones(model):
    tok = load_tokenizer(model)
    for text in TRICKY + random_texts(300, seed=1):
        assert tok.encode_with_spans(text) == former_sp_spans(tok, text), repr(text)
        assert tok.encode_with_spans(text)[0] == tok.encode(text)


def test_hugging_face_spans_are_the_library_ones(tmp_path):
    pytest.importorskip("tokenizers")
    from test_hf_tokenizer import CONFIG, KINDS, _folder, _train

    from flipvqa.hf_tokenizer import HFTokenizer

    for kind in KINDS:
        tok = HFTokenizer(_folder(tmp_path / kind, _train(kind), {"tokenizer_config.json": CONFIG}) / "tokenizer.json")
        for text in TRICKY + random_texts(200, seed=2):
            enc = tok.tok.encode(text, add_special_tokens=False)
            assert tok.encode_with_spans(text) == (enc.ids, [tuple(o) for o in enc.offsets]), (kind, repr(text))


# ---------------------------------------------------------------------------- torchrun
def _rank(rank: int, world: int, folder: str, init: str) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    if rank:  # only rank 0 may encode: the others read its file
        dataset_module._encode = lambda *a, **k: (_ for _ in ()).throw(AssertionError(f"rank {rank} encoded"))
    tok = load_tokenizer(LLAMA)
    ds = dataset(make_records("sub"), tok, True, True, CachePlace([Path(folder)], "train-train", Dist(rank, world, rank)))
    out = {"path": str(ds.encoding.path), "items": [{t: [vars(s) for s in v] for t, v in e.items()} for e in ds.encoded]}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def test_under_torchrun_rank_0_encodes_once_and_every_rank_maps_its_file(tmp_path, llama_tokenizer):
    import torch.multiprocessing as mp

    folder = tmp_path / "cache"
    folder.mkdir()
    mp.spawn(_rank, args=(2, str(folder), str(tmp_path / "init")), nprocs=2)
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and Path(ranks[0]["path"]).parent == folder
    want = [{t: [vars(s) for s in v] for t, v in e.items()} for e in items_of(dataset(make_records("sub"), llama_tokenizer,
                                                                                      True, True))]
    assert ranks[0]["items"] == want
    shutil.rmtree(folder)
