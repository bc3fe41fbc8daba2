"""What a new user meets first, through the real ``flipvqa`` command: help, version, quiet mode,
flags a command does not take, and one clear line (exit 2) for every mistake."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REF, case_dir, case_flags, expected, expected_val

CHECKPOINT = case_dir("nextqa") / "checkpoint.pth"


def flipvqa(*argv, timeout=300) -> subprocess.CompletedProcess:
    """Run the installed ``flipvqa`` script (``python -m flipvqa`` when it is not on PATH)."""
    exe = shutil.which("flipvqa")
    cmd = [exe] if exe else [sys.executable, "-m", "flipvqa"]
    return subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("flipvqa: error:")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def eval_flags(name="nextqa", **kw):
    return ["eval", *case_flags(name, resume=CHECKPOINT if name == "nextqa" else case_dir(name) / "checkpoint.pth",
                                batch_size=3, **kw)]


# ---------------------------------------------------------------------------- help and version
@pytest.mark.parametrize("command", ["train", "eval", "ask", "bench"])
def test_help_is_clean(command):
    run = flipvqa(command, "--help")
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "%(" not in text and "(default: None)" not in text and "``" not in text
    assert "30%" in text if command in ("train", "bench") else True  # the escaped % prints as itself
    for block in text.split("\n  --")[1:]:  # one flag's help: at most one default
        assert block.count("(default") <= 1, block


def test_each_command_lists_only_its_flags():
    helps = {c: flipvqa(c, "--help").stdout for c in ("train", "eval", "ask", "bench")}
    for flag in ("--epochs", "--blr", "--accum_iter", "--warmup_epochs", "--vaq"):
        assert flag in helps["train"] and flag not in helps["eval"] and flag not in helps["ask"]
    for flag in ("--preset", "--dataset", "--output_dir", "--batch_size"):
        assert flag not in helps["ask"]
    assert "--split" in helps["eval"] and "--split" not in helps["train"]
    assert "--dtype" in helps["ask"] and "--resume" in helps["ask"]


def test_top_level_help_and_version():
    from flipvqa import __version__

    run = flipvqa("--help")
    assert run.returncode == 0 and "``" not in run.stdout and "COMMAND" in run.stdout
    run = flipvqa("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"flipvqa {__version__}"


def test_flags_a_command_does_not_take_are_errors():
    run = flipvqa("ask", "v.mp4", "--question", "why", "--choices", "a", "b", "--resume", CHECKPOINT,
                  "--preset", "nextqa")
    assert run.returncode == 2 and "unrecognized arguments: --preset" in run.stderr
    run = flipvqa("ask", "v.mp4", "--question", "why", "--choices", "a", "b", "--resume", CHECKPOINT,
                  "--epochs", "3")
    assert run.returncode == 2 and "unrecognized arguments: --epochs" in run.stderr
    run = flipvqa("train", "--split", "val")
    assert run.returncode == 2 and "unrecognized arguments: --split" in run.stderr
    line = one_line_error(flipvqa("demo", "--epochs", "0", "--output_dir", "unused"))
    assert "--epochs" in line


def test_eval_takes_the_authors_evaluation_command(tmp_path):
    """Their evaluation command is the training command with eval.py and --resume: it works, and
    the training options it carries are named as ignored."""
    run = flipvqa(*eval_flags(output_dir=tmp_path), "--epochs", "5", "--warmup_epochs", "2", "--blr", "9e-2",
                  "--weight_decay", "0.14", "--accum_iter", "2")
    assert run.returncode == 0, run.stderr
    assert "eval ignores the training options --epochs --accum_iter --warmup_epochs --blr --weight_decay" in run.stderr
    want = expected("nextqa")["val"]["accuracy"]
    assert f"accuracy: {want:.4f}" in run.stdout


# ---------------------------------------------------------------------------- quiet
def test_quiet_after_the_command_silences_progress_bars(tmp_path):
    loud = flipvqa(*eval_flags(output_dir=tmp_path / "a"))
    assert loud.returncode == 0 and "eval val" in loud.stderr  # the progress bar and info lines
    quiet = flipvqa(*eval_flags(output_dir=tmp_path / "b"), "-q")
    assert quiet.returncode == 0 and "eval val" not in quiet.stderr and "\r" not in quiet.stderr
    assert "accuracy:" in quiet.stdout


# ---------------------------------------------------------------------------- mistakes, one line each
def test_max_seq_len_shorter_than_the_prompt(tmp_path):
    line = one_line_error(flipvqa(*eval_flags(output_dir=tmp_path, max_seq_len=40)))
    assert "--max_seq_len 40" in line and "needs --max_seq_len" in line
    train = ["train", *case_flags("nextqa", output_dir=tmp_path, max_seq_len=40, epochs=1)]
    line = one_line_error(flipvqa(*train))
    assert "does not fit" in line and "needs --max_seq_len" in line and "NaN" not in line


def test_dtype_spellings_and_unknown_dtype_and_device(tmp_path):
    from flipvqa.config import resolve

    for spelling, canonical in [("float16", "fp16"), ("half", "fp16"), ("bfloat16", "bf16"), ("float32", "fp32")]:
        assert resolve(argparse.Namespace(dtype=spelling)).dtype == canonical
    line = one_line_error(flipvqa(*eval_flags(output_dir=tmp_path), "--dtype", "float8"))
    assert "--dtype float8" in line and "bf16" in line and "fp32" in line
    line = one_line_error(flipvqa(*eval_flags(output_dir=tmp_path), "--device", "gpu"))
    assert "--device gpu" in line and "cpu" in line


def test_cheap_checks_come_before_the_backbone(tmp_path):
    """With a backbone that does not exist, each of these must be the error reported."""
    no_backbone = {"model": "no-such-backbone"}
    line = one_line_error(flipvqa(*eval_flags(output_dir=tmp_path, dataset="nope", **no_backbone)))
    assert "unknown dataset 'nope'" in line
    flags = eval_flags(output_dir=tmp_path, **no_backbone)
    flags[flags.index("--resume") + 1] = str(tmp_path / "missing.pth")
    line = one_line_error(flipvqa(*flags))
    assert "missing.pth" in line and "not found" in line
    line = one_line_error(flipvqa("ask", "v.mp4", "--question", "why", "--choices", "only one",
                                  "--resume", CHECKPOINT, "--model", "no-such-backbone"))
    assert "--choices" in line and "2 to" in line


def test_features_of_the_wrong_width(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(case_dir("nextqa") / "data", data)
    path = data / "nextqa" / "clipvitl14.pth"
    feats = torch.load(path)
    torch.save({k: v[:, :512].clone() for k, v in feats.items()}, path)
    flags = eval_flags(output_dir=tmp_path)
    flags[flags.index("--data_path") + 1] = str(data)
    line = one_line_error(flipvqa(*flags))
    assert "clipvitl14.pth" in line and "512" in line and "768" in line and "checkpoint.pth" in line


# ---------------------------------------------------------------------------- eval takes the checkpoint's options
def test_eval_takes_model_options_from_the_checkpoint(tmp_path):
    ckpt = torch.load(CHECKPOINT, weights_only=False)
    stored = vars(ckpt["args"])
    stored["llama_model_path"] = str(REF / "llama")  # the case's is relative to its own folder
    stored["adapter_len"], stored["adapter_layer"] = 10, 2
    torch.save(ckpt, tmp_path / "ckpt.pth")
    data = str(case_dir("nextqa") / "data")
    base = ["eval", "--resume", tmp_path / "ckpt.pth", "--dataset", "nextqa", "--data_path", data,
            "--num_workers", "0", "--batch_size", "3"]
    run = flipvqa(*base, "--output_dir", tmp_path / "out")  # no --model, --adapter_layer, ...
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions_val.jsonl")]
    want = {i: scores for i, (scores, _) in expected_val("nextqa").items()}
    for r in rows:
        assert r["scores"] == pytest.approx(want[r["index"]], abs=1e-4)
    line = one_line_error(flipvqa(*base, "--output_dir", tmp_path / "out2", "--adapter_len", "5"))
    assert "adapter_query.weight" in line  # an explicit flag still wins


# ---------------------------------------------------------------------------- ask's text output
def test_ask_text_output_is_aligned_and_explained():
    from flipvqa.ask import Answer
    from flipvqa.ask_command import format_answer

    answer = Answer("a much longer choice", 1, [("a much longer choice", 0.7, 1.2), ("b", 0.3, 2.05)])
    lines = format_answer(answer).splitlines()
    rows = lines[1:3]
    assert rows[0].index("1.2000") == rows[1].index("2.0500")  # aligned columns
    assert "softmax" in format_answer(answer) and "cross-entropy" in format_answer(answer)
    assert lines[-1] == "answer: a much longer choice"


def test_gitignore_covers_what_the_demo_and_examples_write():
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    run = subprocess.run(["git", "check-ignore", "flipvqa_demo/data/x.csv", "end.png", "why.png"],
                         cwd=root, capture_output=True, text=True)
    assert run.stdout.split() == ["flipvqa_demo/data/x.csv", "end.png", "why.png"]
