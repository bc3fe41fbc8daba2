"""The report's HTML: one self-contained page (inline CSS, PNGs as base64 data URIs). Every text
taken from a file goes through :func:`esc`."""

from __future__ import annotations

import base64
import html
from typing import Iterable, Optional

from . import analysis
from .analysis import Mistake, TypeRow
from .runs import Run

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.group td { background: #fafafa; font-weight: 600; }
tr.overall td { border-top: 2px solid #888; font-weight: 600; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
ul.notes li, p.note { color: #7a4b00; }
ol.options { margin: 0; padding-left: 0; list-style: none; }
.right { color: #1a7f37; font-weight: 600; } .chosen { color: #b42318; font-weight: 600; }
td.bias { text-align: right; min-width: 3em; }
code { font-size: .95em; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def pct(fraction: Optional[float]) -> str:
    return "" if fraction is None else f"{100 * fraction:.1f} %"


def image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def table(rows: Iterable[str], head: str, id_: str, caption: str = "") -> str:
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f'<table id="{id_}">{cap}<thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def tr(cells: Iterable[str], cls: str = "") -> str:
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>" if cls else "<tr>" + "".join(cells) + "</tr>"


def td(text: str, cls: str = "", style: str = "") -> str:
    """A cell of already escaped ``text``."""
    attrs = (f' class="{cls}"' if cls else "") + (f' style="{style}"' if style else "")
    return f"<td{attrs}>{text}</td>"


def th(text: str, cls: str = "") -> str:
    return f'<th class="{cls}">{text}</th>' if cls else f"<th>{text}</th>"


# ---------------------------------------------------------------------------- the page
def render(runs: list[Run], curves_png: bytes, val_png: bytes, curves_note: str) -> str:
    names = ", ".join(r.name for r in runs)
    parts = [f"<h1>Flipped-VQA training report</h1><p>Runs: {esc(names)}</p>",
             '<section id="summary"><h2>Summary</h2>', summary_table(runs), "</section>",
             '<section id="curves"><h2>Training curves</h2>',
             f'<p class="note">{esc(curves_note)}</p>' if curves_note else "",
             image(curves_png, f"Training losses and learning rate of {names}"), "</section>",
             '<section id="validation"><h2>Validation accuracy</h2>',
             image(val_png, f"Validation accuracy per epoch of {names}"), "</section>"]
    parts += [run_section(run, k) for k, run in enumerate(runs, 1)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Flipped-VQA report: {esc(names)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


def summary_table(runs: list[Run]) -> str:
    head = tr(th(h) for h in ("Run", "Folder", "Dataset", "Preset", "Epochs logged",
                              "Best val accuracy", "Best epoch", "Paper", "Options from"))
    rows = []
    for run in runs:
        best, epoch = run.best
        paper = analysis.paper_accuracy(run)
        rows.append(tr([td(esc(run.name)), td(f"<code>{esc(run.path)}</code>"),
                        td(esc(run.dataset) if run.dataset else "unknown"),
                        td(esc(run.args.get("preset") or "")), td(str(len(run.log)), "num"),
                        td(pct(best), "num best"), td(str(epoch), "num"),
                        td(f"{paper[1]:.1f} %" if paper else "", "num"),
                        td(esc(run.args_source) if run.args_source else "none")]))
    return table(rows, head, "summary", "Best validation accuracy from log.txt (val_acc); paper: the "
                 "accuracy the paper reports for the run's preset (LLaMA 7B).")


def run_notes(run: Run) -> list[str]:
    notes = []
    if run.repeated:
        notes.append(f"log.txt logs epoch(s) {', '.join(map(str, run.repeated))} more than once (a resumed or "
                     "restarted run); the last entry of each is used.")
    if run.steps is None:
        notes.append("no metrics.jsonl: the training curves are per epoch, from log.txt.")
    if run.args_source is None:
        notes.append("no run.json and no checkpoint_best.pth: the run's options, its dataset included, "
                     "are unknown.")
    if run.predictions is None:
        notes.append("no predictions_val.jsonl (flipvqa train writes it with the best checkpoint, only once "
                     "an epoch's val accuracy is above 0): no per-type accuracy, mistakes or position bias.")
    elif len(analysis.answered(run)) < len(run.predictions):
        n = len(run.predictions) - len(analysis.answered(run))
        notes.append(f"{n} of {len(run.predictions)} predictions have no answer; they are left out below.")
    acc, (best, _) = analysis.overall(run), run.best
    if acc is not None and round(100 * acc, 1) != round(100 * best, 1):
        notes.append(f"the predictions' accuracy ({pct(acc)}) differs from log.txt's best val_acc ({pct(best)}).")
    return notes


def run_section(run: Run, k: int) -> str:
    best, epoch = run.best
    notes = run_notes(run)
    parts = [f'<section class="run" id="run-{k}"><h2>Run {k}: {esc(run.name)}</h2>',
             f"<p>Folder <code>{esc(run.path)}</code>; dataset <b>{esc(run.dataset or 'unknown')}</b>; best "
             f'validation accuracy <b class="best">{pct(best)}</b> at epoch {epoch}.</p>']
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if run.predictions is not None and analysis.answered(run):
        mistakes = analysis.top_mistakes(run)
        why = analysis.attach_questions(run, mistakes) if mistakes else None
        parts += ["<h3>Accuracy per question type</h3>", type_section(run, analysis.type_table(run), k),
                  f"<h3>Most confident mistakes (top {analysis.TOP_MISTAKES})</h3>", mistakes_section(mistakes, why, k),
                  "<h3>Answer-position bias</h3>", bias_section(run, k)]
    parts.append("</section>")
    return "\n".join(parts)


def type_section(run: Run, rows: list[TypeRow], k: int) -> str:
    paper = analysis.paper_accuracy(run)
    head = tr([th("Type"), th("Questions", "num"), th("Accuracy", "num")]
              + ([th(f"Paper ({esc(paper[0])}, LLaMA 7B)", "num")] if paper else []))
    body = [tr([td(esc(r.name)), td(str(r.count), "num"), td(pct(r.accuracy), "num")] + ([td("")] if paper else []),
               "group" if r.group else "") for r in rows]
    n = len(analysis.answered(run))
    body.append(tr([td("Overall"), td(str(n), "num"), td(pct(analysis.overall(run)), "num")]
                   + ([td(f"{paper[1]:.1f} %", "num")] if paper else []), "overall"))
    note = ""
    if run.dataset is None:
        note = '<p class="note">The dataset is unknown, so the question types are too: overall accuracy only.</p>'
    elif not rows:
        note = f'<p class="note">{esc(run.dataset)} has no question types: overall accuracy only.</p>'
    return note + table(body, head, f"types-{k}", "Plain accuracy of predictions_val.jsonl (the best epoch) "
                        "per question type; rows in bold are groups of types.")


def _option(k: int, text: Optional[str]) -> str:
    label = f"({analysis.letter(k)})"
    return esc(label if text is None else f"{label} {text}")


def _mark(j: int, row: dict) -> str:
    return ' class="right"' if j == row["answer"] else ' class="chosen"' if j == row["prediction"] else ""


def mistakes_section(mistakes: list[Mistake], why: Optional[str], k: int) -> str:
    if not mistakes:
        return "<p>No mistakes: every answered question was right.</p>"
    note = f'<p class="note">Question text not shown: {esc(why)}.</p>' if why else ""
    head = tr([th("#"), th("Video"), th("Index"), th("Question"), th("Right"), th("Chosen"),
               th("p(chosen)", "num"), th("p(right)", "num"), th("All options: p")])
    rows = []
    for n, m in enumerate(mistakes, 1):
        r, rec = m.row, m.record
        opts = rec.options if rec is not None and len(rec.options) == len(m.probs) else None
        text = (lambda j: None if opts is None else opts[j])
        items = "".join(
            f'<li{_mark(j, r)}>'
            f"{_option(j, text(j))}: {p:.3f}</li>" for j, p in enumerate(m.probs))
        qid = f" (qid {esc(r['qid'])})" if r.get("qid") not in (None, "") else ""
        rows.append(tr([td(str(n), "num"), td(esc(r["vid"])), td(f"{r['index']}{qid}", "idx"),
                        td(esc(rec.question) if rec is not None else "\u2014"),
                        td(_option(r["answer"], text(r["answer"])), "right"),
                        td(_option(r["prediction"], text(r["prediction"])), "chosen"),
                        td(f"{m.confidence:.3f}", "num"), td(f"{m.probs[r['answer']]:.3f}", "num"),
                        td(f'<ol class="options">{items}</ol>')]))
    return note + table(rows, head, f"mistakes-{k}", "Wrong predictions with the highest probability on the "
                        "chosen option; probabilities are softmax(&minus;scores) over the question's options.")


def bias_section(run: Run, k: int) -> str:
    letters, counts = analysis.position_bias(run)
    top = max((c for row in counts for c in row), default=0) or 1
    head = tr([th("right \\ chosen")] + [th(esc(x), "num") for x in letters] + [th("total", "num")])
    rows = []
    for i, x in enumerate(letters):
        cells = [td(str(c), "bias", f"background: rgba({'26,127,55' if i == j else '31,119,180'},"
                                    f"{0.08 + 0.6 * c / top:.2f})" if c else "") for j, c in enumerate(counts[i])]
        rows.append(tr([th(esc(x))] + cells + [td(str(sum(counts[i])), "num")]))
    chosen = [sum(row[j] for row in counts) for j in range(len(letters))]
    rows.append(tr([th("total")] + [td(str(c), "num") for c in chosen] + [td(str(sum(chosen)), "num")], "overall"))
    n = sum(chosen) or 1
    share = ", ".join(f"{x} {100 * c / n:.1f} %" for x, c in zip(letters, chosen))
    return (table(rows, head, f"bias-{k}", "Counts of questions by right option (rows) and chosen option "
                  "(columns); the diagonal is correct.")
            + f"<p>Chosen letters: {esc(share)}.</p>")
