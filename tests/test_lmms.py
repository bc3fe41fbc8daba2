"""``lmms-eval --model flipvqa`` (src/flipvqa/lmms) against ``flipvqa eval`` on the same questions.

The end-to-end test runs the real lmms-eval command line, offline, on the local tasks of
tests/lmms_tasks: the NExT-QA reference case's questions (videos by id, from features=), questions
about generated video files (the tiny random CLIP of test_features.py; one file is garbage, one is
missing) and open-ended questions (generate_until). Every per-option value, pick and answer in its
--log_samples output is compared with what ``flipvqa eval`` computes in the test. lmms-eval exits
0 even when an evaluation fails, so only its result files count. The request grouping and the
generation settings are also tested without lmms-eval.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flipvqa.cli import main
from flipvqa.errors import FlipVQAError
from flipvqa.lmms.requests import cut_at, generation_settings, group_options

from conftest import REF, case_dir, case_flags

try:
    from test_features import make_video, tiny_clip  # noqa: F401  (the fixture is reused)
except pytest.skip.Exception:  # no PyAV: the end-to-end test is skipped, the others run
    make_video = None

TASKS = Path(__file__).parent / "lmms_tasks"
CHECKPOINT = case_dir("nextqa") / "checkpoint.pth"
NEXTQA_FEATURES = case_dir("nextqa") / "data" / "nextqa" / "clipvitl14.pth"
OPEN = {"task": "flipvqa_open", "until": ("\n\n", "."), "max_new_tokens": 6}  # as in flipvqa_open.yaml
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (CI installs it: "
                                "pip install -c .ci/lmms-constraints.txt -e '.[lmms]', see README)")
needs_videos = pytest.mark.skipif(make_video is None, reason="PyAV is not installed")


# --------------------------------------------------------------------------- requests, without lmms-eval


def request(context: str, option: str, idx: int, doc_id: int, task: str = "t", split: str = "val"):
    """A stand-in for lmms-eval's Instance of a multiple_choice task (what group_options reads)."""
    return SimpleNamespace(args=(context, " " + option, None, doc_id, task, split), idx=idx, task_name=task)


def test_group_options_recovers_each_documents_options_in_order() -> None:
    a = [request("why?", o, k, 0) for k, o in enumerate(["x", "y", "z"])]
    b = [request("how?", o, k, 1) for k, o in enumerate(["p", "q"])]
    other_task = [request("why?", o, k, 0, task="u") for k, o in enumerate(["m", "n"])]
    mixed = [a[2], b[0], a[0], other_task[1], b[1], a[1], other_task[0], a[0]]  # a[0] twice: a repeat
    questions, where = group_options(mixed)
    assert [(q.task, q.doc_id, q.context, q.option_list()) for q in questions] == [
        ("t", 0, "why?", ["x", "y", "z"]), ("t", 1, "how?", ["p", "q"]), ("u", 0, "why?", ["m", "n"])]
    assert where == [(0, 2), (1, 0), (0, 0), (2, 1), (1, 1), (0, 1), (2, 0), (0, 0)]


@pytest.mark.parametrize("requests, message", [
    ([SimpleNamespace(args=("", " x"), idx=0, task_name="t")], "use metric acc instead"),  # acc_mutual_info
    ([request("why?", "x", 0, 0)], "1 options; flipvqa scores 2 to 26 per question (output_type loglikelihood"),
    ([request("why?", "x", 0, 0), request("why?", "y", 2, 0)], "options [0, 2] arrived, not 0..1"),
    ([request("why?", "x", 0, 0), request("how?", "y", 1, 0)], "different contexts"),
    ([request("why?", "x", 0, 0), request("why?", " ", 1, 0)], "task t, doc 0: option 1 is empty"),
    ([request(" ", "x", 0, 3), request(" ", "y", 1, 3)], "task t, doc 3: the question (the request's context) is empty"),
    ([request("q", str(k), k, 0) for k in range(27)], "27 options"),
    ([SimpleNamespace(args=("q", print, None, 0, "t", "val"), idx=0, task_name="t")], "scores multiple_choice tasks"),
])
def test_group_options_refuses_what_it_cannot_score(requests: list, message: str) -> None:
    with pytest.raises(FlipVQAError, match=re.escape(message)):
        group_options(requests)


def test_generation_settings_and_until() -> None:
    settings = generation_settings({"until": ["\n\n", ""], "max_new_tokens": 16, "temperature": 0.7,
                                    "do_sample": False, "top_p": 0.9, "num_beams": 1}, 32, "task t, doc 0")
    assert settings.until == ("\n\n",) and settings.max_new_tokens == 16 and settings.temperature == 0.0
    assert settings.top_p == 0.9
    assert generation_settings({"until": "Q:", "temperature": 0.5}, 32, "w") == \
        generation_settings({"until": ["Q:"], "temperature": 0.5, "max_new_tokens": 32}, 99, "w")
    assert generation_settings(None, 8, "w").max_new_tokens == 8
    with pytest.raises(FlipVQAError, match="task t, doc 0: num_beams 4"):
        generation_settings({"num_beams": 4}, 32, "task t, doc 0")
    with pytest.raises(FlipVQAError, match="'until' must be a string or a list of strings"):
        generation_settings({"until": [3]}, 32, "w")
    assert cut_at("to eat. then sleep\n\nmore", ["\n\n", "."]) == "to eat"
    assert cut_at("to eat", ["\n\n"]) == "to eat"


# --------------------------------------------------------------------------- the plugin, in process


@needs_lmms
def test_bare_tuples_are_stringified_but_generation_results_pass() -> None:
    """lmms-eval 0.7.3's evaluator passes every model output through unwrap_generation_output,
    which turns a (float, bool) loglikelihood into a string; the plugin returns
    GenerationResult(text=(value, is_greedy)), which passes untouched. If an upgrade changes
    either, this fails before a run silently scores strings."""
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    assert unwrap_generation_output((1.5, True))[0] == "(1.5, True)", "lmms-eval now keeps bare tuples"
    assert unwrap_generation_output(GenerationResult(text=(1.5, True)))[0] == (1.5, True)


def _refused(call, capsys: pytest.CaptureFixture) -> str:
    """The one line a bad model arg or request ends the run with (exit status 2, as flipvqa's)."""
    with pytest.raises(SystemExit) as done:
        call()
    assert done.value.code == 2
    return capsys.readouterr().err.strip()


@needs_lmms
def test_flipvqa_is_an_lmms_eval_model_with_one_line_errors(capsys: pytest.CaptureFixture) -> None:
    from lmms_eval.models import get_model

    cls = get_model("flipvqa")
    backbone = f"llama_model_path={REF / 'llama'},model=tiny"
    make = cls.create_from_arg_string
    assert _refused(lambda: make(f"checkpoint={CHECKPOINT},colour=red"), capsys).startswith(
        "flipvqa: error: model_args: unknown colour (known: checkpoint, clip_model, features")
    assert _refused(lambda: make("checkpoint=/nowhere.pth"), capsys) == \
        "flipvqa: error: model_args: checkpoint=/nowhere.pth: file not found"
    assert "batch_size=auto must be an integer" in _refused(lambda: make(f"checkpoint={CHECKPOINT},batch_size=auto"),
                                                            capsys)
    assert "expected key=value pairs" in _refused(lambda: make(f"{CHECKPOINT}"), capsys)
    assert "give clip_model= " in _refused(lambda: make(f"checkpoint={CHECKPOINT},{backbone},device=cpu"), capsys)
    # model_args win over the command line's default --batch_size 1 (which would clash otherwise)
    lm = make(f"checkpoint={CHECKPOINT},{backbone},features={NEXTQA_FEATURES},batch_size=4",
              {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size_per_gpu == 4 and lm.answerer.args.max_feats == 10  # max_feats: the checkpoint's
    assert "generate_until_multi_round is not supported" in _refused(lambda: lm.generate_until_multi_round([]), capsys)


# --------------------------------------------------------------------------- lmms-eval end to end


@pytest.fixture(scope="module")
def lmms_setup(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> dict:
    """Videos, their features (extract-features), the generic datasets flipvqa eval reads and
    flipvqa eval's predictions on all three tasks' questions."""
    from flipvqa.features.extract import extract_features

    root = tmp_path_factory.mktemp("lmms")
    videos = root / "videos"
    videos.mkdir()
    make_video(videos / "walk.mp4", 100, noise=True)  # 4 s: 4 frames
    make_video(videos / "run.mp4", 60, rate=5, noise=True)  # 12 s: more frames than max_feats
    (videos / "broken.mp4").write_bytes(b"\x00not a video" * 300)  # "gone.mp4" does not exist at all
    for name, rows, features in [("vids", "videos.jsonl", None), ("open", "open.jsonl", NEXTQA_FEATURES)]:
        (root / "data" / name).mkdir(parents=True)
        shutil.copy(TASKS / "data" / rows, root / "data" / name / "val.jsonl")
        if features is not None:
            shutil.copy(features, root / "data" / name / "features.pth")
    summary = extract_features([videos], tiny_clip, root / "data" / "vids" / "features.pth", fps=1, batch_size=4,
                               device="cpu")
    assert summary["extracted"] == 2 and len(summary["failed"]) == 1  # broken.mp4: a zero frame in eval
    evals = {"flipvqa_nextqa_ref": _eval(root / "ev_ref", "--batch_size", "3"),
             "flipvqa_videos": _eval(root / "ev_vids", "--dataset", "vids", "--data_path", str(root / "data")),
             OPEN["task"]: _eval(root / "ev_open", "--dataset", "open", "--data_path", str(root / "data"),
                                 "--max_new_tokens", str(OPEN["max_new_tokens"]))}
    return {"root": root, "evals": evals}


def _eval(output_dir: Path, *flags: str) -> dict[int, dict]:
    """``flipvqa eval`` of the NExT-QA reference checkpoint: its prediction rows by index."""
    assert main(["eval", *case_flags("nextqa"), "--resume", str(CHECKPOINT), "--device", "cpu", *flags,
                 "--output_dir", str(output_dir)]) == 0
    rows = [json.loads(line) for line in (output_dir / "predictions_val.jsonl").read_text().splitlines()]
    return {row["index"]: row for row in rows}


def _lmms_eval(root: Path, tasks: str, **model_args) -> subprocess.CompletedProcess:
    """The lmms-eval command line, offline, on local tasks, writing under ``root / "out"``."""
    args = {"checkpoint": CHECKPOINT, "llama_model_path": REF / "llama", "model": "tiny", "device": "cpu",
            "features": NEXTQA_FEATURES, **model_args}
    script = Path(sys.executable).parent / "lmms-eval"
    command = [str(script) if script.exists() else shutil.which("lmms-eval") or "lmms-eval",
               "--model", "flipvqa", "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
               "--include_path", str(TASKS), "--tasks", tasks, "--output_path", str(root / "out"), "--log_samples"]
    hf = root / "hf"
    env = {**os.environ, "HF_HOME": str(hf), "HF_DATASETS_CACHE": str(hf / "datasets"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLIPVQA_LMMS_VIDEOS": str(root / "videos"),
           "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    # cwd: the tasks' relative data_files are read from the current folder
    return subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)


def _results(out: Path, tasks: list[str], log: str) -> tuple[dict, dict]:
    """What an lmms-eval run wrote: per task its logged samples by doc id, and the results'
    "results" (lmms-eval exits 0 even when an evaluation fails: only these files count)."""
    found = sorted(out.glob("**/*_results.json"))
    assert found, f"lmms-eval wrote no results:\n{log[-4000:]}"
    samples = {}
    for task in tasks:
        files = sorted(out.glob(f"**/*_samples_{task}.jsonl"))
        assert files, f"no samples of {task}:\n{log[-4000:]}"
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
        samples[task] = {row["doc_id"]: row for row in rows}
    return samples, json.loads(found[-1].read_text())["results"]


@needs_lmms
@needs_videos
def test_lmms_eval_reproduces_flipvqa_eval(lmms_setup: dict, tiny_clip: Path) -> None:
    tasks = ["flipvqa_nextqa_ref", "flipvqa_videos", OPEN["task"]]
    # batch_size 3: the reference case's 8 questions in batches of 3, 3 and 2, flipvqa eval's too
    done = _lmms_eval(lmms_setup["root"], ",".join(tasks), clip_model=tiny_clip, batch_size=3)
    log = done.stdout + done.stderr
    samples, results = _results(lmms_setup["root"] / "out", tasks, log)
    for task in ("flipvqa_nextqa_ref", "flipvqa_videos"):
        evals = lmms_setup["evals"][task]
        assert sorted(samples[task]) == sorted(evals), task
        for doc_id, sample in samples[task].items():
            row = evals[doc_id]
            values = [float(value) for value, _ in sample["filtered_resps"]]
            picks = [str(greedy) == "True" for _, greedy in sample["filtered_resps"]]
            assert values == pytest.approx(row["scores"], abs=1e-4), (task, doc_id)
            assert min(range(len(values)), key=values.__getitem__) == row["prediction"], (task, doc_id)
            assert picks == [k == row["prediction"] for k in range(len(values))], (task, doc_id)
            assert sample["acc"] == float(row["prediction"] == row["answer"]), (task, doc_id)
        correct = sum(row["prediction"] == row["answer"] for row in evals.values()) / len(evals)
        assert results[task]["acc,none"] == pytest.approx(correct), task
    opened, evals = samples[OPEN["task"]], lmms_setup["evals"][OPEN["task"]]
    assert sorted(opened) == sorted(evals)
    for doc_id, sample in opened.items():
        row = evals[doc_id]
        assert sample["filtered_resps"] == cut_at(row["prediction"], OPEN["until"]).strip(), doc_id
        assert sample["exact_match"] == float(sample["filtered_resps"] == row["answer"][0]), doc_id
    # an unreadable video and a missing one are one warning each, and the run went on
    assert "broken.mp4: cannot be read" in log and "gone.mp4: video file not found" in log


@needs_lmms
def test_lmms_eval_stops_on_a_question_that_does_not_fit_in_one_line(tmp_path: Path) -> None:
    """A FlipVQAError inside a request ends the lmms-eval run with flipvqa's one line naming the
    document, and exit status 2 (not lmms-eval's traceback and status 0)."""
    done = _lmms_eval(tmp_path, "flipvqa_nextqa_ref", max_seq_len=40, batch_size=3)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-4000:]
    assert re.search(r"flipvqa: error: task flipvqa_nextqa_ref, doc 0: the question and choices take \d+ tokens, "
                     r"more than the model's --max_seq_len 40", done.stderr), done.stderr[-4000:]
    assert not list(tmp_path.glob("out/**/*_results.json"))
