"""``flipvqa report``: the HTML page about training runs, from hand-built run folders (known
numbers) and one real short training run."""

import base64
import csv
import html
import io
import json
import math
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import flipvqa.cli
from flipvqa import report
from flipvqa.cli import main

from conftest import REF, case_dir

LETTERS = "ABCDE"


@pytest.fixture(autouse=True)
def report_command(monkeypatch):
    monkeypatch.setitem(flipvqa.cli.PLUGINS, "report", ("flipvqa.report", "write an HTML report of training runs"))


# ---------------------------------------------------------------------------- building runs
def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_predictions(n, seed=0, n_options=5, qtype=lambda i: 1 + i % 8):
    """Deterministic predictions: random scores, about half of them right."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scores = [rng.uniform(0.5, 3.0) for _ in range(n_options)]
        pred = min(range(n_options), key=scores.__getitem__)
        answer = pred if rng.random() < 0.45 else rng.randrange(n_options)
        rows.append({"index": i, "qid": f"q{i}", "vid": f"v{i}", "answer": answer, "prediction": pred,
                     "scores": scores, "qtype": qtype(i)})
    return rows


def accuracy(rows):
    return sum(r["prediction"] == r["answer"] for r in rows) / len(rows)


def make_run(folder, predictions=None, val_accs=(0.3, None, 0.4), steps_per_epoch=6, args=None):
    """A run folder; the ``None`` in ``val_accs`` is the predictions' accuracy (the best epoch)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    best = accuracy(predictions) if predictions else 0.5
    accs = [best if a is None else a for a in val_accs]
    log = [{"train_lr": 1e-4 * (e + 1), "train_loss": 3.0 - e, "train_vqa_loss": 1.5 - e / 2,
            "train_vaq_loss": 1.0 - e / 4, "train_qav_loss": 0.5 - e / 4, "epoch": e, "val_lr": 1e-4,
            "val_C": a, "val_T": a, "val_D": a, "val_Total": a, "val_acc": a} for e, a in enumerate(accs)]
    write_jsonl(folder / "log.txt", log)
    if steps_per_epoch:
        steps = [{"step": s + 1, "epoch": s // steps_per_epoch, "lr": 1e-5 * (s + 1), "loss": 3 - s / 10,
                  "vqa_loss": 1.5 - s / 30, "vaq_loss": 1 - s / 30, "qav_loss": 0.5 - s / 30,
                  "grad_norm": 1 + (s % 3), "seconds": 0.1} for s in range(steps_per_epoch * len(accs))]
        write_jsonl(folder / "metrics.jsonl", steps)
    if predictions is not None:
        write_jsonl(folder / "predictions_val.jsonl", predictions)
    if args is not None:
        (folder / "run.json").write_text(json.dumps({"args": args}))
    return folder


def write_nextqa_val(data_path, n):
    """``<data_path>/nextqa/val.csv`` for videos v0..v{n-1}; questions hold HTML-special characters."""
    root = Path(data_path) / "nextqa"
    root.mkdir(parents=True)
    types = ["CH", "CW", "TN", "TC", "TP", "DL", "DC", "DO"]
    with open(root / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"])
        for i in range(n):
            w.writerow([f"v{i}", f"what is <b>{i}</b> & why", 0, f"q{i}", types[i % 8],
                        *[f"option {i}.{k} <i>" for k in range(5)]])


# ---------------------------------------------------------------------------- reading the page
class Tables(HTMLParser):
    """Every table with an id: its rows as lists of cell texts."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.current, self.row, self.cell = {}, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.current = self.tables.setdefault(dict(attrs).get("id"), [])
        elif tag == "tr" and self.current is not None:
            self.row = []
            self.current.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def body(table):
    return table[1:]  # after the header row


def pngs(page_text):
    """Every embedded PNG, decoded with PIL."""
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page_text):
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        images.append(img)
    return images


def run_report(capsys, *argv):
    assert main(["report", *map(str, argv)]) == 0
    out = capsys.readouterr().out.strip()
    return Path(out), Path(out).read_text(encoding="utf-8")


def softmax_neg(scores):
    e = [math.exp(-s) for s in scores]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------------------- tests
def test_handmade_run_values(tmp_path, capsys):
    preds = make_predictions(40)
    write_nextqa_val(tmp_path / "data", 40)
    folder = make_run(tmp_path / "run <&>", preds, args={"dataset": "nextqa", "data_path": "data",
                                                           "preset": "nextqa", "sub": False})
    path, text = run_report(capsys, folder)
    assert path == folder / "report.html"
    assert "run &lt;&amp;&gt;" in text and "run <&>" not in text  # the folder name, escaped
    images = pngs(text)
    assert len(images) == 2 and all(img.format == "PNG" and 500 < img.width < 2000 and 300 < img.height < 1500
                                    for img in images)
    tables = Tables(text).tables
    acc = accuracy(preds)

    # best validation accuracy: log.txt's epoch 1, which is the predictions' accuracy
    summary = body(tables["summary"])[0]
    assert summary[5] == f"{100 * acc:.1f} %" and summary[6] == "1" and summary[7] == "72.0 %"
    assert f'<b class="best">{100 * acc:.1f} %</b> at epoch 1' in text

    # per type: NExT-QA's 8 types, its 3 groups, overall with the paper's 72.0 %
    want = {}
    names = {1: "CH", 2: "CW", 3: "TN", 4: "TC", 5: "TP", 6: "DL", 7: "DC", 8: "DO"}
    for code, name in names.items():
        want[name] = [r for r in preds if r["qtype"] == code]
    for g, codes in {"C": (1, 2), "T": (3, 4, 5), "D": (6, 7, 8)}.items():
        want[g] = [r for r in preds if r["qtype"] in codes]
    rows = body(tables["types-1"])
    assert [r[0] for r in rows] == [*want, "Overall"]
    for name, count, value, paper in rows[:-1]:
        assert int(count) == len(want[name]) and value == f"{100 * accuracy(want[name]):.1f} %" and paper == ""
    assert rows[-1] == ["Overall", "40", f"{100 * acc:.1f} %", "72.0 %"]

    # the most confident mistakes, in order, with the questions (escaped) and probabilities
    wrong = [r for r in preds if r["prediction"] != r["answer"]]
    wrong.sort(key=lambda r: -softmax_neg(r["scores"])[r["prediction"]])
    assert len(wrong) > 10
    rows = body(tables["mistakes-1"])
    assert [int(r[2].split()[0]) for r in rows] == [r["index"] for r in wrong[:10]]
    for row, r in zip(rows, wrong):
        p = softmax_neg(r["scores"])
        assert row[1] == r["vid"] and row[3] == f"What is <b>{r['index']}</b> & why?"
        assert row[4] == f"({LETTERS[r['answer']]}) option {r['index']}.{r['answer']} <i>"
        assert row[5] == f"({LETTERS[r['prediction']]}) option {r['index']}.{r['prediction']} <i>"
        assert row[6] == f"{p[r['prediction']]:.3f}" and row[7] == f"{p[r['answer']]:.3f}"
    assert "What is &lt;b&gt;" in text and "<b>0</b>" not in text

    # position bias: counts[right][chosen], with totals
    rows = body(tables["bias-1"])
    for i, row in enumerate(rows[:5]):
        assert row[0] == LETTERS[i]
        assert [int(c) for c in row[1:6]] == [sum(r["answer"] == i and r["prediction"] == j for r in preds)
                                              for j in range(5)]
        assert int(row[6]) == sum(r["answer"] == i for r in preds)
    assert [int(c) for c in rows[5][1:6]] == [sum(r["prediction"] == j for r in preds) for j in range(5)]


def test_real_training_run(tmp_path, capsys):
    data = case_dir("nextqa") / "data"
    out = tmp_path / "trained"
    assert main(["-q", "train", "--dataset", "nextqa", "--data_path", str(data), "--llama_model_path",
                 str(REF / "llama"), "--model", "tiny", "--adapter_layer", "2", "--max_seq_len", "128",
                 "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "2",
                 "--output_dir", str(out)]) == 0
    capsys.readouterr()
    path, text = run_report(capsys, out, "--output", tmp_path / "pages" / "r.html")
    assert path == tmp_path / "pages" / "r.html"
    assert all(img.width > 500 and img.height > 300 for img in pngs(text)) and len(pngs(text)) == 2
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    preds = [json.loads(line) for line in (out / "predictions_val.jsonl").read_text().splitlines()]
    best = max(e["val_acc"] for e in log)
    tables = Tables(text).tables
    assert body(tables["summary"])[0][2] == "nextqa" and body(tables["summary"])[0][5] == f"{100 * best:.1f} %"
    assert body(tables["types-1"])[-1][:3] == ["Overall", str(len(preds)), f"{100 * accuracy(preds):.1f} %"]
    from flipvqa.data import load_split

    questions = {r.index: r.question for r in load_split(data, "nextqa", "val")}
    for row in body(tables["mistakes-1"]):
        assert row[3] == questions[int(row[2].split()[0])]


def test_two_runs_on_the_same_plots(tmp_path, capsys):
    from flipvqa.report import plots
    from flipvqa.report.runs import load_runs

    a = make_run(tmp_path / "alpha", make_predictions(12, 1), args={"dataset": "nextqa"})
    b = make_run(tmp_path / "beta", make_predictions(12, 2), val_accs=(None, 0.1), steps_per_epoch=0,
                 args={"dataset": "nextqa"})
    path, text = run_report(capsys, a, b, "--output", tmp_path / "both.html")
    assert "alpha" in text and "beta" in text and 'id="run-2"' in text
    assert "No metrics.jsonl in beta" in text and "Question text not shown: the run&#x27;s options name no " \
                                                 "data_path" in text
    assert len(pngs(text)) == 2
    runs = load_runs([str(a), str(b)])
    assert plots.curve_mode(runs) == "mixed"
    fig = plots.training_figure(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["alpha", "beta"]
    assert len(fig.axes[0].lines) == 2
    plots.png(fig)
    fig = plots.val_figure(runs)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["alpha", "beta"]
    plots.png(fig)
    # both with metrics.jsonl: per step, long runs smoothed; two folders of one name told apart
    c = make_run(tmp_path / "x" / "run", make_predictions(5), steps_per_epoch=300)
    d = make_run(tmp_path / "y" / "run", make_predictions(5, 3), steps_per_epoch=300)
    runs = load_runs([str(c), str(d)])
    assert plots.curve_mode(runs) == "step" and [r.name for r in runs] == ["x/run", "y/run"]
    fig = plots.training_figure(runs)
    assert fig.axes[0].get_xlabel() == "optimizer step"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["x/run", "y/run"]
    img = Image.open(io.BytesIO(plots.png(fig)))
    assert img.size == (1300, 750)


def test_unreadable_dataset_and_unknown_options(tmp_path, capsys):
    preds = make_predictions(30)
    a = make_run(tmp_path / "a", preds, args={"dataset": "nextqa", "data_path": "nowhere"})
    _, text = run_report(capsys, a)
    assert "Question text not shown: the dataset folder is not there: neither nowhere/nextqa nor " in text
    rows = body(Tables(text).tables["mistakes-1"])
    assert len(rows) == 10 and all(r[3] == "\u2014" and re.fullmatch(r"\([A-E]\)", r[4]) for r in rows)
    # a val split that is not the one predicted
    write_nextqa_val(tmp_path / "other", 3)
    b = make_run(tmp_path / "b", preds, args={"dataset": "nextqa", "data_path": str(tmp_path / "other")})
    _, text = run_report(capsys, b)
    assert "does not match predictions_val.jsonl" in text
    # no run.json, no checkpoint: overall accuracy only
    c = make_run(tmp_path / "c", preds)
    _, text = run_report(capsys, c)
    tables = Tables(text).tables
    assert body(tables["summary"])[0][2] == "unknown" and body(tables["summary"])[0][8] == "none"
    assert [r[0] for r in body(tables["types-1"])] == ["Overall"]
    assert "the run&#x27;s dataset is unknown" in text
    # no predictions at all
    d = make_run(tmp_path / "d", None, val_accs=(0.0, 0.0))
    _, text = run_report(capsys, d)
    assert "no predictions_val.jsonl" in text and "mistakes-1" not in text


def test_generic_dataset_types_and_option_counts(tmp_path, capsys):
    root = tmp_path / "data" / "clips"
    root.mkdir(parents=True)
    rng = random.Random(5)
    preds, lines = [], []
    for i in range(16):
        n = 3 if i % 2 else 4
        scores = [rng.uniform(0, 2) for _ in range(n)]
        pred = min(range(n), key=scores.__getitem__)
        answer = (pred + i % 3) % n
        kind = ["why", "what"][i % 4 == 0]
        preds.append({"index": i, "qid": None, "vid": f"c{i}", "answer": answer, "prediction": pred,
                      "scores": scores, "qtype": kind})
        lines.append({"video": f"c{i}", "question": f"q {i}", "options": [f"o{k}" for k in range(n)],
                      "answer": answer, "type": kind})
    write_jsonl(root / "val.jsonl", lines)
    folder = make_run(tmp_path / "gen", preds, args={"dataset": "clips", "data_path": str(tmp_path / "data")})
    _, text = run_report(capsys, folder)
    tables = Tables(text).tables
    rows = body(tables["types-1"])
    assert [r[0] for r in rows] == ["what", "why", "Overall"]
    for name, count, value in (r[:3] for r in rows[:2]):
        sel = [p for p in preds if p["qtype"] == name]
        assert int(count) == len(sel) and value == f"{100 * accuracy(sel):.1f} %"
    assert tables["bias-1"][0] == ["right \\ chosen", "A", "B", "C", "D", "total"]
    assert body(tables["mistakes-1"])[0][3].startswith("Q ")


def test_repeated_epochs_keep_the_last(tmp_path, capsys):
    folder = make_run(tmp_path / "r", make_predictions(8), val_accs=(0.1, 0.2, 0.3))
    with open(folder / "log.txt", "a") as f:  # resumed after epoch 0: epochs 1, 2 again
        for e, a in ((1, 0.6), (2, 0.5)):
            f.write(json.dumps({"epoch": e, "val_acc": a}) + "\n")
    _, text = run_report(capsys, folder)
    assert "log.txt logs epoch(s) 1, 2 more than once" in text
    assert body(Tables(text).tables["summary"])[0][5:7] == ["60.0 %", "1"]


def _bad_line(path, text):
    def setup(folder):
        Path(folder / path).write_text(text)
    return setup


MALFORMED = {
    "log_json": (_bad_line("log.txt", '{"epoch": 0, "val_acc": 0.5}\n{oops\n'), "log.txt: line 2 is not valid JSON"),
    "log_no_acc": (_bad_line("log.txt", '{"epoch": 0}\n'), "log.txt: entry 1 has no 'val_acc' field"),
    "log_percent": (_bad_line("log.txt", '{"epoch": 0, "val_acc": 72.0}\n'), "expected a fraction in 0..1"),
    "log_empty": (_bad_line("log.txt", "\n"), "log.txt: no epoch logged"),
    "log_text": (_bad_line("log.txt", '{"epoch": "one", "val_acc": 0.5}\n'), "malformed 'epoch'"),
    "metrics": (_bad_line("metrics.jsonl", '{"step": 1, "epoch": 0, "loss": 1}\n'),
                "metrics.jsonl: entry 1 has no 'lr'"),
    "preds_range": (_bad_line("predictions_val.jsonl", '{"index": 0, "prediction": 7, "scores": [1, 2]}\n'),
                    "predictions_val.jsonl: entry 1 has prediction 7, outside the 2 scored options"),
    "preds_scores": (_bad_line("predictions_val.jsonl", '{"index": 0, "prediction": 0, "scores": "x"}\n'),
                     "predictions_val.jsonl: entry 1 has malformed 'scores'"),
    "run_json": (_bad_line("run.json", "[1, 2]"), "run.json: expected a JSON object"),
    "run_args": (_bad_line("run.json", '{"options": {}}'), "run.json: no 'args' object"),
    "checkpoint": (_bad_line("checkpoint_best.pth", "not a checkpoint"), "checkpoint_best.pth: not a PyTorch file"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_are_one_line(case, tmp_path, capsys):
    folder = make_run(tmp_path / "run", make_predictions(4))
    setup, message = MALFORMED[case]
    setup(folder)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(folder) in err, err
    assert not (folder / "report.html").exists()


def test_bad_run_dirs_and_output_are_one_line(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    good = make_run(tmp_path / "good", make_predictions(4))
    for argv, message in (([tmp_path / "file.txt"], "file.txt: not a folder"),
                          ([tmp_path / "missing"], "missing: not a folder"),
                          ([good, tmp_path / "empty"], "empty: holds no log.txt"),
                          ([good, "--output", tmp_path], "is a folder; --output names the page's file")):
        assert main(["report", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_run_called_directly(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    folder = make_run(tmp_path / "direct", make_predictions(6))
    assert report.run(parser.parse_args([str(folder), "--output", str(tmp_path / "p.html")])) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p.html")
    assert html.unescape((tmp_path / "p.html").read_text()).count("direct") >= 2
