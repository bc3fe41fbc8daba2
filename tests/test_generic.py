"""The generic dataset format: each reference case rewritten in it (JSONL and CSV) gives the
built-in readers' token ids, losses, scores and training log; any number of options; any
feature width; every malformed input is one line naming the file and the line."""

import csv
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from flipvqa import data
from flipvqa.cli import main
from flipvqa.errors import FlipVQAError
from flipvqa.data.dataset import VQADataset, collate
from flipvqa.io import read_json, read_jsonl

from conftest import CASES, REF, case_dir, case_flags, expected
from test_model import reference_model

SPLIT_FILES = {"nextqa": "{split}.csv", "star": "STAR_{split}.json", "dramaqa": "AnotherMissOhQA_{split}_set.json",
               "vlep": "vlep_{split}_release.jsonl", "tvqa": "tvqa_{split}.jsonl"}


# ---------------------------------------------------------------------------- the rewrite
def raw_rows(name: str, split: str) -> list[dict]:
    root = case_dir(name) / "data" / name
    path = root / SPLIT_FILES[name].format(split="dev" if name == "vlep" and split == "val" else split)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)


def window(name: str, raw: dict):
    """The question's (start, end) in seconds, as the built-in reader reads it; None: whole video."""
    if name == "star":
        return float(raw["start"]), float(raw["end"])
    if name == "vlep":
        return float(raw["ts"][0]), float(raw["ts"][1])
    if name == "tvqa":
        start, end = map(float, raw["ts"].split("-"))
        return None if math.isnan(start) else (start, end)
    return None


def rewrite(name: str, dst, fmt: str) -> str:
    """Write reference case ``name`` in the generic format under ``dst/<generic name>/``."""
    case = expected(name)["case"]
    src = case_dir(name) / "data"
    out = dst / f"{name}-generic"
    out.mkdir(parents=True)
    features = torch.load(src / name / "clipvitl14.pth")
    if name == "dramaqa":  # scenes are their shots' frames, under the scene's own id
        features = dict(features)
    for split in ("train", "val"):
        records = data.load_split(src, name, split, case["sub"])
        rows = []
        for rec, raw in zip(records, raw_rows(name, split)):
            row = {"video": rec.vid, "question": rec.question, "options": rec.options, "answer": rec.answer}
            if rec.qid is not None:
                row["qid"] = rec.qid
            if name == "nextqa":
                row["type"] = raw["type"]
            span = window(name, raw)
            if span is not None:
                row["start"], row["end"] = span
            if name == "vlep" and case["sub"]:
                row["subtitles"] = rec.dialogue.removeprefix("Dialogue: ").removesuffix("\n")
            if name == "dramaqa" and rec.vid.endswith("0000") and rec.frames is not None:
                features[rec.vid] = rec.frames.half()
            rows.append(row)
        write_split(out / f"{split}.{fmt}", rows)
    torch.save(features, out / "features.pth")
    if name == "tvqa":
        (out / "meta.json").write_text(json.dumps({"fps": 3}))
        shutil.copytree(src / name / "tvqa_subtitles", out / "subtitles")
    return out.name


def write_split(path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    most = max(len(r["options"]) for r in rows)
    columns = ["video", "question", "answer", *[f"a{k}" for k in range(most)], "qid", "type", "start", "end",
               "subtitles"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            cells = {k: v for k, v in r.items() if k != "options"}
            cells.update({f"a{k}": o for k, o in enumerate(r["options"])})
            writer.writerow(cells)


def encoded(name: str, data_path, dataset: str, split: str, tokenizer) -> list:
    case = expected(name)["case"]
    records = data.load_split(data_path, dataset, split, case["sub"])
    ds = VQADataset(records, tokenizer, data.n_options(dataset), case["max_feats"], case["max_seq_len"], case["sub"],
                    train=split == "train", tasks=("vqa", "vaq", "qav") if split == "train" else ("vqa",))
    return ds


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("name", CASES)
def test_reference_cases_rewritten_give_the_same_numbers(name, fmt, tmp_path, llama_tokenizer):
    generic = rewrite(name, tmp_path, fmt)
    builtin_path = case_dir(name) / "data"
    model, case = reference_model(name)
    exp = expected(name)
    # A CSV cell cannot hold an empty dialogue (an empty cell means "no field": the .srt file is
    # looked up), so a VLEP question without subtitles ("Dialogue: \n") needs the JSONL form.
    inexpressible = {"train": set(), "val": set()}
    for split in ("train", "val"):
        ours = encoded(name, tmp_path, generic, split, llama_tokenizer)
        theirs = encoded(name, builtin_path, name, split, llama_tokenizer)
        if fmt == "csv" and name == "vlep":
            inexpressible[split] = {i for i, r in enumerate(theirs.records) if r.dialogue == "Dialogue: \n"}
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if i in inexpressible[split]:
                continue
            assert a.sequences == b.sequences, (split, i)  # token ids, label starts, video positions
            torch.testing.assert_close(a.video, b.video, atol=0, rtol=0)
            assert (a.record.answer, a.record.options, a.record.dialogue) == (b.record.answer, b.record.options,
                                                                             b.record.dialogue)
    assert len(inexpressible["val"]) <= 1
    train = encoded(name, tmp_path, generic, "train", llama_tokenizer)
    for batch in exp["train"]["batches"]:
        if inexpressible["train"] & set(batch["index"]):
            continue
        with torch.no_grad():
            vqa, vaq, qav = model(collate([train[i] for i in batch["index"]]))
        assert [vqa.item(), vaq.item(), qav.item()] == pytest.approx(
            [batch["vqa_loss"], batch["vaq_loss"], batch["qav_loss"]], abs=1e-4)
    val = encoded(name, tmp_path, generic, "val", llama_tokenizer)
    for batch in exp["val"]["batches"]:
        if inexpressible["val"] & set(batch["index"]):
            continue
        scores = model.score_options(collate([val[i] for i in batch["index"]]))
        torch.testing.assert_close(scores, torch.tensor(batch["scores"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tvqa", "vlep", "nextqa"])
def test_training_log_of_a_rewritten_case(name, tmp_path):
    generic = rewrite(name, tmp_path / "data", "jsonl")
    spec = json.loads((case_dir(name) / "train" / "train.json").read_text())
    flags = case_flags(name, resume=case_dir(name) / "checkpoint.pth", output_dir=tmp_path / "out", **spec["flags"])
    flags[flags.index("--data_path") + 1] = str(tmp_path / "data")
    flags[flags.index("--dataset") + 1] = generic
    assert main(["-q", "train", *flags]) == 0
    got = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert len(got) == len(spec["epochs"])
    groups = set(data.type_groups(name)) | {"Total"}
    for line, want in zip(got, spec["epochs"]):
        want = {k: v for k, v in want["log"].items() if k.removeprefix("val_") not in groups}
        assert list(line) == list(want)  # the generic format has no C/T/D groups in its log
        for key, value in want.items():
            assert line[key] == pytest.approx(value, abs=1e-4), (key, line["epoch"])


# ---------------------------------------------------------------------------- any number of options
MIXED = [2, 3, 4, 5, 8, 3, 2, 8]


def mixed_dataset(root, width: int = 768, counts=MIXED) -> str:
    """A generic dataset whose questions have ``counts`` options (train and val alike)."""
    out = root / "mixed"
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    words = "red green blue cat dog runs sleeps jumps ball box tree door".split()
    rows, features = [], {}
    for i, n in enumerate(counts):
        vid = f"v{i}"
        features[vid] = torch.randn(4 + i, width, generator=gen).half()
        options = [f"the {words[(i + k) % len(words)]} {words[(2 * k + 1) % len(words)]}" for k in range(n)]
        rows.append({"video": vid, "question": f"what happens {i} times", "options": options, "answer": i % n,
                     "type": "count" if i % 2 else "describe"})
    for split in ("train", "val"):
        write_split(out / f"{split}.jsonl", rows)
    torch.save(features, out / "features.pth")
    return out.name


def test_options_of_different_counts_score_as_one_question_alone(tmp_path, llama_tokenizer):
    name = mixed_dataset(tmp_path)
    model, case = reference_model("nextqa")
    records = data.load_split(tmp_path, name, "val")
    val = VQADataset(records, llama_tokenizer, None, case["max_feats"], case["max_seq_len"], False, train=False,
                     tasks=("vqa",))
    shared = model.score_options(collate([val[i] for i in range(len(val))]))  # one batch, prefix sharing
    assert shared.shape == (len(MIXED), max(MIXED))
    model.naive = True
    for q, item in enumerate(val[i] for i in range(len(val))):
        for k in range(len(item.record.options)):  # the option on its own: no sharing, no padding options
            alone = item.__class__(item.record, item.video, item.video_len, {"vqa": [item.sequences["vqa"][k]]})
            want = model.score_options(collate([alone]))[0, 0]
            assert shared[q, k].item() == pytest.approx(want.item(), abs=1e-5), (q, k)


def test_train_and_eval_on_mixed_options_and_1024_wide_features(tmp_path):
    name = mixed_dataset(tmp_path / "data", width=1024)
    tiny = ["--llama_model_path", str(REF / "llama"), "--model", "tiny", "--num_workers", "0",
            "--max_seq_len", "160", "--adapter_layer", "2"]
    out = tmp_path / "out"
    assert main(["-q", "train", "--dataset", name, "--data_path", str(tmp_path / "data"), *tiny, "--vaq", "--qav",
                 "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "3", "--blr", "1",
                 "--output_dir", str(out)]) == 0
    log = [json.loads(line) for line in open(out / "log.txt")]
    assert len(log) == 2 and all(math.isfinite(e["train_loss"]) for e in log)
    ckpt = torch.load(out / "checkpoint_best.pth", weights_only=False)
    assert ckpt["model"]["visual_proj.weight"].shape[1] == 1024  # the checkpoint records the width
    assert main(["-q", "eval", "--dataset", name, "--data_path", str(tmp_path / "data"), *tiny, "--batch_size", "4",
                 "--resume", str(out / "checkpoint_best.pth"), "--output_dir", str(out / "eval")]) == 0
    rows = [json.loads(line) for line in open(out / "eval" / "predictions_val.jsonl")]
    assert [len(r["scores"]) for r in rows] == MIXED
    assert all(0 <= r["prediction"] < n for r, n in zip(rows, MIXED))
    assert {r["qtype"] for r in rows} == {"count", "describe"}


def test_prediction_only_split(tmp_path, capsys):
    name = mixed_dataset(tmp_path / "data")
    path = tmp_path / "data" / name / "test.jsonl"
    rows = [json.loads(line) for line in open(tmp_path / "data" / name / "val.jsonl")]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in rows))
    flags = ["--dataset", name, "--data_path", str(tmp_path / "data"), "--llama_model_path", str(REF / "llama"),
             "--model", "tiny", "--num_workers", "0", "--max_seq_len", "160", "--resume", str(case_dir("nextqa") /
             "checkpoint.pth"), "--adapter_layer", "2", "--output_dir", str(tmp_path / "out"), "--split", "test"]
    assert main(["-q", "eval", *flags]) == 0
    assert "predictions only" in capsys.readouterr().out
    preds = [json.loads(line) for line in open(tmp_path / "out" / "predictions_test.jsonl")]
    assert len(preds) == len(rows) and all(p["answer"] is None for p in preds)


# ---------------------------------------------------------------------------- bad input, one line each
GOOD = {"video": "v0", "question": "what happens", "options": ["a cat", "a dog"], "answer": 1}
BAD_LINES = [
    ("{not json", "not valid JSON"),
    (json.dumps({**GOOD, "options": "a cat"}), "'options' must be a list"),
    (json.dumps({**GOOD, "options": ["only one"], "answer": 0}), "1 options; 2 to 26"),
    (json.dumps({**GOOD, "options": [f"o{k}" for k in range(27)], "answer": 0}), "27 options; 2 to 26"),
    (json.dumps({**GOOD, "answer": 2}), "answer 2 is outside 0..1"),
    (json.dumps({**GOOD, "answer": "a bird"}), "'a bird' is not among the options"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "video"}), "'video' is missing"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "question"}), "'question' is missing"),
    (json.dumps({**GOOD, "start": 1}), "both 'start' and 'end'"),
]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "flipvqa", *map(str, argv)], capture_output=True, text=True,
                          timeout=300)


def small_generic(root, val_lines: list[str]):
    out = root / "mine"
    out.mkdir(parents=True)
    (out / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    (out / "val.jsonl").write_text("".join(line + "\n" for line in val_lines))
    torch.save({"v0": torch.zeros(3, 768).half()}, out / "features.pth")
    return ["eval", "--dataset", "mine", "--data_path", root, "--llama_model_path", REF / "llama", "--model", "tiny",
            "--resume", case_dir("nextqa") / "checkpoint.pth", "--adapter_layer", "2", "--num_workers", "0",
            "--output_dir", root / "out"]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_malformed_line_is_one_line_naming_file_and_line(tmp_path, line, message):
    run = run_cli(*small_generic(tmp_path, [json.dumps(GOOD), line]))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    err = [e for e in run.stderr.splitlines() if e.startswith("flipvqa: error:")]
    assert len(err) == 1 and "val.jsonl:2:" in err[0] and message in err[0], run.stderr


def test_other_bad_datasets(tmp_path):
    argv = small_generic(tmp_path, [json.dumps(GOOD), json.dumps({k: v for k, v in GOOD.items() if k != "answer"})])
    run = run_cli(*argv)
    assert run.returncode == 2 and "some questions have an answer and some do not" in run.stderr
    (tmp_path / "mine" / "val.jsonl").unlink()
    run = run_cli(*argv)
    assert run.returncode == 2 and "no val.jsonl or val.csv" in run.stderr
    (tmp_path / "mine" / "val.jsonl").write_text(json.dumps(GOOD) + "\n")
    torch.save({"v0": torch.zeros(3, 768), "v1": torch.zeros(2, 512)}, tmp_path / "mine" / "features.pth")
    run = run_cli(*argv)
    assert run.returncode == 2 and "features of different widths" in run.stderr and "'v1' is 512-d" in run.stderr
    torch.save({"v0": torch.zeros(3, 512)}, tmp_path / "mine" / "features.pth")
    run = run_cli(*argv)
    assert run.returncode == 2 and "512-d" in run.stderr and "takes 768-d" in run.stderr


def test_csv_gaps_and_answers_as_text(tmp_path):
    out = tmp_path / "csvset"
    out.mkdir()
    (out / "val.csv").write_text("video,question,answer,a0,a1,a2,type\n"
                                 "v0,why,a dog,a cat,a dog,,causal\n"
                                 "v0,how,2,x,y,z,\n")
    torch.save({"v0": torch.zeros(3, 768).half()}, out / "features.pth")
    recs = data.load_split(tmp_path, "csvset", "val")
    assert [r.options for r in recs] == [["a cat", "a dog"], ["x", "y", "z"]]
    assert [r.answer for r in recs] == [1, 2] and [r.qtype for r in recs] == ["causal", -1]
    assert recs[0].question == "Why?"


def test_line_endings_and_line_separators(tmp_path):
    """The reader streams the file: a JSONL line ends at "\\n" only (CRLF is fine; U+2028 inside
    a string is text, not a line break), and an error still names the right line; a CSV's quoted
    cell keeps its line break."""
    out = tmp_path / "ends"
    out.mkdir()
    rows = [dict(GOOD, question="what\u2028happens"), dict(GOOD, question="then what")]
    (out / "val.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    torch.save({"v0": torch.zeros(3, 768).half()}, out / "features.pth")
    recs = data.load_split(tmp_path, "ends", "val")
    assert [r.question for r in recs] == ["What\u2028happens?", "Then what?"] and [r.index for r in recs] == [0, 1]
    (out / "val.jsonl").write_bytes(b"\n".join([json.dumps(GOOD).encode(), b"", b"{broken"]) + b"\n")
    with pytest.raises(FlipVQAError, match=r"val\.jsonl:3: not valid JSON"):
        data.load_split(tmp_path, "ends", "val")
    (out / "val.jsonl").unlink()
    (out / "val.csv").write_bytes(b'video,question,answer,a0,a1\r\nv0,"two\r\nlines",0,yes,no\r\nv0,why,1,a,b\r\n')
    recs = data.load_split(tmp_path, "ends", "val")
    assert [r.question for r in recs] == ["Two\nlines?", "Why?"] and recs[1].options == ["a", "b"]
