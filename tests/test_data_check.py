"""``flipvqa data check`` through the real command line: every planted problem of a generic
dataset reported once, with its file and line; the counts; a clean dataset; a built-in one."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from flipvqa.prompts import encode_sample, normalize_question, prompt_text
from flipvqa.tokenizer import load_tokenizer

REF = Path(__file__).parent / "fixtures" / "reference"
TOKENIZER = REF / "llama" / "tokenizer.model"
LONG_QUESTION = "why did the boy " + " ".join(["and then the girl ran after the dog"] * 40)
MEDIUM_QUESTION = "what colour is the car that the woman in the red coat drives past the old church"
OPTIONS4 = ["to catch a bus", "he was late", "a dog", "rain"]


def flipvqa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flipvqa", "data", "check", "-q", *args,
                           "--tokenizer_path", str(TOKENIZER), "--model", "nowhere", "--llama_model_path", "nowhere"],
                          capture_output=True, text=True, timeout=300)


def check_json(*args: str) -> tuple[int, dict]:
    proc = flipvqa(*args, "--json")
    assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr  # exactly one JSON object
    return proc.returncode, json.loads(proc.stdout)


def q(video="v0", question="why did the boy run", options=OPTIONS4, answer=1, **kw) -> str:
    row = {"video": video, "question": question, "options": options, "answer": answer, **kw}
    return json.dumps({k: v for k, v in row.items() if v is not None})


def write_features(root: Path, nan_video: bool = False) -> None:
    torch.manual_seed(0)
    feats = {f"v{k}": torch.randn(3 + k, 768).half() for k in range(6)}
    if nan_video:  # a video no split uses: every video of the file is checked
        feats["vnan"] = torch.randn(4, 768).half()
        feats["vnan"][2, 5] = float("nan")
    torch.save(feats, root / "features.pth")


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# (line, text, what the error says) of the planted malformed lines; None: a good line.
TRAIN = [
    (q(), None),
    ('{"video": "v1", "question": "broken"', "not valid JSON"),
    (q(options="a b c"), "'options' must be a list of strings"),
    (q(options=["only"], answer=0), "1 options; 2 to 26"),
    (q(options=[f"option {k}" for k in range(27)]), "27 options; 2 to 26"),
    (q(options=["a", "b", "c"], answer=5), "answer 5 is outside 0..2"),
    (q(answer="zebra"), "answer 'zebra' is not among the options"),
    (q(video=None), "'video' is missing"),
    (q(question=None), "'question' is missing"),
    (q(video="ghost"), None),  # no features
    (q(video="v1", question=LONG_QUESTION), None),  # does not fit --max_seq_len
    (q(video="v2", question=MEDIUM_QUESTION), None),  # truncated, still usable
    (q(video="v3", options=["a cup", "a book", "a hat"], answer="a book"), None),
    ("", None),  # blank lines are skipped, and still counted as lines
    (q(video="v4", question="what is on the table", options=["a cup", "a book"], answer=0), None),
]
VAL = [
    (q(video="v1"), None),
    ('{"video": "v1", ', "not valid JSON"),
    (q(video="v5", options=["a", "b", "c", "d", "e"], answer=4), None),
    (q(answer=4), "answer 4 is outside 0..3"),
    (q(question=None), "'question' is missing"),
    (q(video="v2", question="who opened the door", answer=0), None),
]


def eval_lengths(tok, question: str, options: list[str], max_seq_len: int = 100_000, tasks=("vqa",)):
    text = prompt_text(normalize_question(question), options)
    return [s for seqs in encode_sample(tok, text, 0, len(options), 10, max_seq_len, False, tasks,
                                        all_options=tasks == ("vqa",)).values() for s in seqs]


def good_rows(lines) -> list[dict]:
    rows = []
    for text, problem in lines:
        if text and problem is None:
            rows.append(json.loads(text))
    return rows


def planted_dataset(tmp_path: Path) -> tuple[Path, int]:
    """The dataset with every planted problem, and the --max_seq_len that truncates the medium
    question by its EOS only (the long one then cannot fit)."""
    root = tmp_path / "data" / "planted"
    root.mkdir(parents=True)
    write_features(root, nan_video=True)
    write_lines(root / "train.jsonl", [text for text, _ in TRAIN])
    write_lines(root / "val.jsonl", [text for text, _ in VAL])
    tok = load_tokenizer(TOKENIZER)
    max_seq_len = max(len(s.ids) for s in eval_lengths(tok, MEDIUM_QUESTION, OPTIONS4)) - 1
    others = [r for r in good_rows(TRAIN) + good_rows(VAL) if r["question"] not in (LONG_QUESTION, MEDIUM_QUESTION)]
    assert all(len(s.ids) <= max_seq_len for r in others for s in eval_lengths(tok, r["question"], r["options"]))
    assert all(s.fits(10, "vqa") for s in eval_lengths(tok, MEDIUM_QUESTION, OPTIONS4, max_seq_len))
    assert not any(s.fits(10, "vqa") for s in eval_lengths(tok, LONG_QUESTION, OPTIONS4, max_seq_len))
    return root, max_seq_len


def test_every_planted_problem_is_reported_once_with_its_file_and_line(tmp_path):
    root, max_seq_len = planted_dataset(tmp_path)
    code, report = check_json("--dataset", "planted", "--data_path", str(root.parent),
                              "--max_seq_len", str(max_seq_len))
    assert code == 2
    errors = report["errors"]
    planted = [(root / name, line, problem) for name, lines in (("train.jsonl", TRAIN), ("val.jsonl", VAL))
               for line, (_, problem) in enumerate(lines, 1) if problem]
    for path, line, problem in planted:
        hits = [e for e in errors if e.startswith(f"{path}:{line}: ")]
        assert len(hits) == 1 and problem in hits[0], (path, line, problem, errors)
    nan = [e for e in errors if "'vnan'" in e]
    assert len(nan) == 1 and str(root / "features.pth") in nan[0] and "non-finite" in nan[0]
    too_long = [e for e in errors if "does not fit" in e]
    tok = load_tokenizer(TOKENIZER)
    needs = max(s.full_length for s in eval_lengths(tok, LONG_QUESTION, OPTIONS4, max_seq_len))
    assert too_long == [f"planted train: question 9 (video v1) does not fit --max_seq_len {max_seq_len}: "
                        f"truncation leaves it no answer or not the whole video; it needs --max_seq_len {needs}"]
    assert len(errors) == len(planted) + 2


def test_counts_of_the_planted_dataset(tmp_path):
    root, max_seq_len = planted_dataset(tmp_path)
    _, report = check_json("--dataset", "planted", "--data_path", str(root.parent), "--max_seq_len", str(max_seq_len))
    assert report["dataset"] == "planted" and report["feature_dim"] == 768
    assert set(report["splits"]) == {"train", "val"}
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert {k: train[k] for k in ("questions", "videos", "missing_features", "truncated", "options")} == \
        {"questions": 6, "videos": 6, "missing_features": 1, "truncated": 2, "options": {"2": 1, "3": 1, "4": 4}}
    assert {k: val[k] for k in ("questions", "videos", "missing_features", "truncated", "options")} == \
        {"questions": 3, "videos": 3, "missing_features": 0, "truncated": 0, "options": {"4": 2, "5": 1}}
    tok = load_tokenizer(TOKENIZER)
    for split, lines in (("train", TRAIN), ("val", VAL)):
        lengths = sorted(len(s.ids) for r in good_rows(lines) for s in eval_lengths(tok, r["question"], r["options"]))
        nearest = {p: lengths[math.ceil(p / 100 * len(lengths)) - 1] for p in (50, 95)}
        assert report["splits"][split]["tokens"] == {"p50": nearest[50], "p95": nearest[95], "max": lengths[-1]}
    assert any("planted train: 1 of 6 questions have no video features" in w and "ghost" in w
               for w in report["warnings"])


def test_readable_report(tmp_path):
    root, max_seq_len = planted_dataset(tmp_path)
    proc = flipvqa("--dataset", "planted", "--data_path", str(root.parent), "--max_seq_len", str(max_seq_len))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("split"))
    assert lines[header].split() == ["split", "questions", "open-ended", "videos", "no", "features", "truncated",
                                     "tokens", "p50", "p95", "max", "options"]
    train, val = lines[header + 1], lines[header + 2]
    assert train.split()[:6] == ["train", "6", "0", "6", "1", "2"] and train.endswith("2:1 3:1 4:4")
    assert val.split()[:6] == ["val", "3", "0", "3", "0", "0"] and val.endswith("4:2 5:1")
    end = lines[header].index("truncated") + len("truncated")  # numbers right-aligned under their names
    assert train[end - 1] == "2" and val[end - 1] == "0" and train[end] == val[end] == " "
    assert lines[header].index("options") == train.index("2:1") == val.index("4:2")
    assert "warnings:" in lines and "errors:" in lines
    assert sum(line.lstrip().startswith(f"{k}. ") for line in lines for k in range(1, 20)) == 13
    assert lines[-1] == "13 errors"


def clean_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "clean"
    root.mkdir(parents=True)
    write_features(root)
    write_lines(root / "train.jsonl", [q(), q(video="v2", question=MEDIUM_QUESTION), q(video="v3", answer=0)])
    write_lines(root / "val.jsonl", [q(video="v4"), q(video="v5", options=["yes", "no"], answer="no")])
    return root


def test_clean_dataset_exits_0(tmp_path):
    root = clean_dataset(tmp_path)
    code, report = check_json("--dataset", "clean", "--data_path", str(root.parent), "--vaq", "--qav")
    assert code == 0 and report["errors"] == []
    assert report["splits"]["train"]["questions"] == 3 and report["splits"]["val"]["options"] == {"2": 1, "4": 1}
    assert all(s["truncated"] == 0 and s["missing_features"] == 0 for s in report["splits"].values())
    proc = flipvqa("--dataset", "clean", "--data_path", str(root.parent))
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "OK: no errors"


def test_training_sequences_are_checked_with_vaq_qav(tmp_path):
    """Cut by two tokens, the medium question's VQA sequences keep an answer token (truncated,
    usable), but its QAV sequence loses a video slot: an error only with --qav."""
    root = clean_dataset(tmp_path)
    tok = load_tokenizer(TOKENIZER)
    full = max(len(s.ids) for s in eval_lengths(tok, MEDIUM_QUESTION, OPTIONS4))
    max_seq_len = full - 2
    assert all(s.fits(10, "vqa") for s in eval_lengths(tok, MEDIUM_QUESTION, OPTIONS4, max_seq_len))
    qav = eval_lengths(tok, MEDIUM_QUESTION, OPTIONS4, max_seq_len, ("qav",))
    assert not qav[0].fits(10, "qav")
    args = ("--dataset", "clean", "--data_path", str(root.parent), "--max_seq_len", str(max_seq_len))
    code, report = check_json(*args)
    assert code == 0 and report["splits"]["train"]["truncated"] == 1
    code, report = check_json(*args, "--qav")
    assert code == 2 and report["splits"]["train"]["truncated"] == 1
    assert report["errors"] == [f"clean train: question 1 (video v2) does not fit --max_seq_len {max_seq_len}: "
                                f"truncation leaves it no answer or not the whole video; it needs "
                                f"--max_seq_len {qav[0].full_length}"]


def test_missing_features_file(tmp_path):
    root = clean_dataset(tmp_path)
    (root / "features.pth").unlink()
    code, report = check_json("--dataset", "clean", "--data_path", str(root.parent))
    assert code == 2 and report["feature_dim"] is None
    assert report["errors"] == [f"{root / 'features.pth'}: features file not found"]
    assert all(s["missing_features"] == s["questions"] for s in report["splits"].values())


def test_mixed_widths(tmp_path):
    root = clean_dataset(tmp_path)
    feats = torch.load(root / "features.pth")
    feats["v5"] = torch.zeros(3, 512).half()
    torch.save(feats, root / "features.pth")
    code, report = check_json("--dataset", "clean", "--data_path", str(root.parent))
    assert code == 2 and report["feature_dim"] == 768
    assert len(report["errors"]) == 1 and "mixed widths" in report["errors"][0] and "'v5'" in report["errors"][0]


def test_builtin_nextqa(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(REF / "cases" / "nextqa" / "data", data)
    code, report = check_json("--dataset", "nextqa", "--data_path", str(data))
    assert code == 0 and report["errors"] == [] and report["feature_dim"] == 768
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert (train["questions"], train["videos"], train["missing_features"], train["options"]) == (4, 4, 0, {"5": 4})
    assert (val["questions"], val["videos"], val["missing_features"], val["options"]) == (8, 8, 1, {"5": 8})
    # A built-in reader stops at its first problem: that split has one error, the others are checked.
    csv = data / "nextqa" / "val.csv"
    csv.write_text(csv.read_text().replace(",TN,", ",XX,"))
    code, report = check_json("--dataset", "nextqa", "--data_path", str(data))
    assert code == 2 and report["splits"]["train"]["questions"] == 4 and report["splits"]["val"]["questions"] == 0
    assert report["errors"] == [f"{csv}: entry 2 has type 'XX', not one of CH, CW, TN, TC, TP, DL, DC, DO"]


def test_a_malformed_builtin_entry_is_one_error(tmp_path):
    root = tmp_path / "data" / "star"
    root.mkdir(parents=True)
    entry = {"question_id": "Interaction_1", "question": "what did the person hold", "video_id": "v0", "start": 0,
             "end": 1, "answer": "a", "choices": [{"choice": "a"}, {"choice_id": 1, "choice": "b"}]}
    (root / "STAR_train.json").write_text(json.dumps([entry]))
    write_features(root)
    (root / "features.pth").rename(root / "clipvitl14.pth")
    code, report = check_json("--dataset", "star", "--data_path", str(root.parent))
    assert code == 2 and list(report["splits"]) == ["train"] and report["warnings"] == []
    assert report["errors"] == [f"{root / 'STAR_train.json'}: entry 0 has malformed 'choices' "
                                f"(a list of {{choice_id, choice}})"]
