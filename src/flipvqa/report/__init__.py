"""``flipvqa report RUN_DIR [RUN_DIR ...] [--output FILE]``: one HTML page about training runs.

A run folder is the ``--output_dir`` of ``flipvqa train``: ``log.txt`` (one JSON line per epoch,
required), and where present ``metrics.jsonl`` (one line per optimizer step),
``predictions_val.jsonl`` (the best epoch's scored val questions) and ``run.json`` (the run's
options; else they are read from ``checkpoint_best.pth``).

The page (default ``<first RUN_DIR>/report.html``) is a single self-contained file that opens
offline: inline CSS, no scripts, and the plots as PNG images embedded as base64 ``data:`` URIs
(nothing is written beside it). It holds:

1. a summary table: per run its dataset, preset, best validation accuracy (from ``log.txt``) and
   epoch, and the paper's accuracy for its preset;
2. the training curves: total, VQA, VAQ and QAV losses, the lr and the gradient norm per optimizer
   step from ``metrics.jsonl`` (per epoch from ``log.txt`` where a run has none; drawn against the
   epoch when only some runs have it), all runs on the same axes;
3. the validation accuracy per epoch, all runs on one plot;
4. per run: the accuracy per question type of ``predictions_val.jsonl``
   (:func:`flipvqa.metrics.per_type_accuracy`), with the paper's overall accuracy beside it; the
   ten most confident mistakes (probabilities ``softmax(-scores)``), with the questions and
   options read from the run's val split when its ``data_path`` can be found (as given, else
   relative to the run folder's parent); and the answer-position bias (right against chosen letter).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FlipVQAError
from ..io import first_line, write_atomic



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a training run folder (the --output_dir of flipvqa train)")
    parser.add_argument("--output", metavar="FILE", default=None,
                        help="where to write the page (default: <first RUN_DIR>/report.html)")


def run(ns: argparse.Namespace) -> int:
    path = write_report(ns.run_dirs, ns.output)
    print(path)
    return 0


def write_report(run_dirs: list[str], output: str | None = None) -> Path:
    """Read the runs, write the page and return its path."""
    from .runs import load_runs

    out = Path(output) if output else Path(run_dirs[0]) / "report.html"
    if out.is_dir():
        raise FlipVQAError(f"{out}: is a folder; --output names the page's file")
    runs = load_runs(run_dirs)
    try:
        from . import page, plots  # matplotlib only once the runs are read
    except ModuleNotFoundError as exc:
        raise FlipVQAError(f"flipvqa report needs the Python package '{exc.name}' (pip install {exc.name})") from None
    mode = plots.curve_mode(runs)
    without = [r.name for r in runs if r.steps is None]
    their = "its" if len(without) == 1 else "their"
    note = {"step": "",
            "epoch": "No run has a metrics.jsonl: losses and lr are the per-epoch training means of log.txt.",
            "mixed": f"No metrics.jsonl in {', '.join(without)}: {their} curves are the per-epoch means of "
                     "log.txt, drawn at the middle of each epoch; every run is drawn against the epoch."}[mode]
    long = [r.name for r in runs if r.steps is not None and len(r.steps) > plots.SMOOTH_ABOVE]
    if long:
        note = (f"{note} Runs of more than {plots.SMOOTH_ABOVE} steps ({', '.join(long)}): every step faint, "
                "their trailing mean over a fiftieth of the run solid.").strip()
    text = page.render(runs, plots.png(plots.training_figure(runs)), plots.png(plots.val_figure(runs)), note)
    try:
        write_atomic(out, lambda f: f.write(text.encode("utf-8")))
    except OSError as exc:
        raise FlipVQAError(f"{out}: cannot be written ({first_line(exc)})") from None
    return out
