"""A generic split's records as a cached table: the same records as the list reader, field by
field (frames and windows included) before and after the cache; a second run and every torchrun
rank but the first parse nothing; a cache for another file is replaced with a note, a damaged
one rebuilt with a warning."""

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from flipvqa import data
from flipvqa.data import generic
from flipvqa.data.cache import FOLDER
from flipvqa.data.dataset import VQADataset
from flipvqa.data.records import load_features
from flipvqa.data.table import RecordTable
from flipvqa.devices import Dist
from flipvqa.errors import FlipVQAError
from flipvqa.tokenizer import load_tokenizer

from conftest import REF
from test_generic import rewrite
from test_open_ended import write_open_dataset

STRANGE = {"video": "v\u00e9\U0001F600", "question": "why \ud800 here", "options": ["", "b"], "answer": 1}


def same(a, b) -> None:
    """Two lists of records are equal in every field; frames bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in x.__slots__:
            u, v = getattr(x, name), getattr(y, name)
            if name == "frames":
                assert (u is None) == (v is None) and (u is None or torch.equal(u, v)), x.index
            else:
                assert u == v and type(u) is type(v), (x.index, name, u, v)


def cases(tmp_path) -> list[tuple[Path, str, bool]]:
    """(data path, dataset, sub): windows (star, tvqa), subtitles (vlep, tvqa), open-ended, a csv."""
    found = [(tmp_path, rewrite(name, tmp_path, fmt), name in ("vlep", "tvqa"))
             for name, fmt in (("star", "jsonl"), ("vlep", "jsonl"), ("tvqa", "csv"), ("nextqa", "csv"))]
    return found + [(tmp_path, write_open_dataset(tmp_path), False)]


def test_a_table_holds_the_same_records_as_the_list(tmp_path):
    for data_path, name, sub in cases(tmp_path):
        root = data_path / name
        features = load_features(generic.features_file(root))
        for split in ("train", "val"):
            want = generic.read(root, split, features, sub)
            table = generic.read_table(root, split, features, sub, "k")
            same(want, list(table))
            same(want[1:3], table[1:3])
            assert table[-1].index == len(want) - 1
            table.write(tmp_path / "t.rec", {})
            loaded = RecordTable.load(tmp_path / "t.rec", features)
            same(want, list(loaded))
            assert loaded.key == "k" and loaded.qtypes() == {r.qtype for r in want}
            assert loaded.all_answered() == all(r.answered for r in want)
            assert loaded.missing_subtitles() == [r.vid for r in want if r.subtitles_missing]


def test_odd_text_and_missing_videos(tmp_path):
    out = tmp_path / "odd"
    out.mkdir()
    rows = [dict(STRANGE, options=["a", "b"]), {"video": "gone", "question": "what", "answer": ["x"]},
            {"video": "gone", "question": "and", "options": ["p", "q"], "answer": 0, "qid": "7", "type": "t"}]
    (out / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save({STRANGE["video"]: torch.randn(3, 768).half()}, out / "features.pth")
    features = load_features(out / "features.pth")
    table = generic.read_table(out, "val", features, False, "k")
    same(generic.read(out, "val", features, False), list(table))
    assert table.missing_features() == ["gone", "gone"] and table[0].question == "Why \ud800 here?"
    assert table.qtypes() == {-1, "t"}


def args_for(data_path, name: str, sub: bool = False, output_dir: str = "") -> argparse.Namespace:
    return argparse.Namespace(data_path=str(data_path), dataset=name, sub=sub, max_feats=10, max_seq_len=160,
                              vaq=True, qav=True, output_dir=output_dir)


def build(data_path, name, sub=False, train=True, dist=None):
    return data.build_dataset(args_for(data_path, name, sub), load_tokenizer(REF / "llama" / "tokenizer.model"),
                              "train", train=train, dist=dist)


def never(*args, **kwargs):
    raise AssertionError("parsed again")


def test_the_second_run_reads_the_cached_table(tmp_path, monkeypatch, caplog):
    name = rewrite("vlep", tmp_path, "jsonl")
    caplog.set_level(logging.INFO, logger="flipvqa.data.cache")
    first = build(tmp_path, name, sub=True)
    assert isinstance(first.records, RecordTable) and "records cached in" in caplog.text
    want = [first[i] for i in range(len(first))]
    monkeypatch.setattr(generic, "_parse", never)
    caplog.clear()
    second = build(tmp_path, name, sub=True)
    assert "records read from" in caplog.text and second.records.path.parent == tmp_path / name / FOLDER
    got = [second[i] for i in range(len(second))]
    for a, b in zip(want, got):
        assert torch.equal(a.video, b.video) and a.sequences == b.sequences and a.video_len == b.video_len
        same([a.record], [b.record])


def test_another_file_replaces_the_table_with_a_note(tmp_path, caplog):
    name = rewrite("nextqa", tmp_path, "jsonl")
    caplog.set_level(logging.INFO, logger="flipvqa.data.cache")
    old = build(tmp_path, name).records.path
    path = tmp_path / name / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["question"] = "why not"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.clear()
    new = build(tmp_path, name)
    assert f"{old}: made for other questions" in caplog.text and "reading the questions again" in caplog.text
    assert new.records[0].question == "Why not?" and not old.exists()
    # the encoding follows the records: its cache was made for the old text and is replaced too
    assert sorted(p.suffix for p in (tmp_path / name / FOLDER).glob("train-*")) == [".enc", ".rec"]


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_table_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    name = rewrite("nextqa", tmp_path, "jsonl")
    path = build(tmp_path, name).records.path
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:-50]
    else:
        raw[-60] ^= 0xFF
    path.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO, logger="flipvqa.data.cache")
    again = build(tmp_path, name)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and "reading the questions again" in w for w in warnings), warnings
    assert len(again.records) == len(generic.read(tmp_path / name, "train", {}, False))


# ---------------------------------------------------------------------------- torchrun
def _rank(rank: int, world: int, data_path: str, name: str, init: str, out: str) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    if rank:  # only rank 0 may read the annotations: the others map its table
        generic._parse = never
    try:
        ds = build(data_path, name, dist=Dist(rank, world, rank))
        result = {"path": str(ds.records.path), "records": [[r.vid, r.question, r.options, r.answer]
                                                            for r in ds.records]}
    except FlipVQAError as exc:
        result = {"error": str(exc)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()


def spawn(tmp_path, name: str) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    mp.spawn(_rank, args=(2, str(tmp_path), name, str(tmp_path / f"init-{name}"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_under_torchrun_rank_0_reads_the_questions_once(tmp_path):
    name = rewrite("star", tmp_path, "jsonl")
    ranks = spawn(tmp_path, name)
    assert ranks[0] == ranks[1] and Path(ranks[0]["path"]).parent == tmp_path / name / FOLDER
    want = generic.read(tmp_path / name, "train", {}, False)
    assert ranks[0]["records"] == [[r.vid, r.question, r.options, r.answer] for r in want]


def test_under_torchrun_a_bad_line_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 fails while reading: it releases the others, which find no table, read the file
    themselves and fail with the same line (instead of waiting for ever)."""
    name = rewrite("nextqa", tmp_path, "jsonl")
    with open(tmp_path / name / "train.jsonl", "a") as f:
        f.write("{broken\n")
    ranks = _spawn_unpatched(tmp_path, name)
    assert ranks[0] == ranks[1] and "train.jsonl" in ranks[0]["error"] and "not valid JSON" in ranks[0]["error"]


def _spawn_unpatched(tmp_path, name):
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    mp.spawn(_rank_reading, args=(2, str(tmp_path), name, str(tmp_path / "init-bad"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _rank_reading(rank: int, world: int, data_path: str, name: str, init: str, out: str) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        build(data_path, name, dist=Dist(rank, world, rank))
        result = {"error": None}
    except FlipVQAError as exc:
        result = {"error": str(exc)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch_dist.destroy_process_group()
