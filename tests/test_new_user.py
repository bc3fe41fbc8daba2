"""What a new user tripped over, each fixed and kept fixed: unclear errors, a silent overwrite,
usage blocks that bury the line that matters, help texts, third-party noise, a README claim.
The server's share (request limits, tokens, duplicates in the API) is in test_serve_limits.py."""

from __future__ import annotations

import argparse
import json
import random
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import case_dir, case_flags
from flipvqa.cli import build_parser, main
from flipvqa.demo import ASSETS
from flipvqa.errors import FlipVQAError
from test_features import tiny_clip  # noqa: F401  (the fixture is reused)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ASSETS / "checkpoint.pth"
NEXTQA = case_dir("nextqa") / "checkpoint.pth"


def one_line(capsys) -> str:
    """The one error line of a command's stderr (notes may come before it), without a traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, env=env)


# ---------------------------------------------------------------------------- ask


def test_duplicate_choices_are_refused(capsys):
    assert main(["ask", "clip.mp4", "--resume", str(DEMO), "--question", "why?", "--choices", "a dog", " A dog"]) == 2
    assert "choices 1 and 2 are the same answer" in one_line(capsys)


def test_an_empty_question_is_refused(capsys):
    assert main(["ask", "clip.mp4", "--resume", str(DEMO), "--question", "  ", "--choices", "a", "b"]) == 2
    assert "--question is empty" in one_line(capsys)


def test_too_many_choices_name_the_max_seq_len_that_fits():
    from flipvqa.ask import Answerer

    demo = {"model": "demo-llama", "llama_model_path": str(ASSETS)}
    choices = [f"the {k}th answer" for k in range(26)]
    with pytest.raises(FlipVQAError) as err:
        Answerer(DEMO, **demo).ask(torch.zeros(2, 768), "what happens?", choices)
    needs = int(re.search(r"run with --max_seq_len (\d+) \(or more\)", str(err.value)).group(1))
    answer = Answerer(DEMO, max_seq_len=needs, **demo).ask(torch.zeros(2, 768), "what happens?", choices)
    assert answer.choice in choices


# ---------------------------------------------------------------------------- eval


def test_eval_neither_overwrites_predictions_nor_scores_untrained_weights_silently(tmp_path, capsys):
    flags = ["eval", *case_flags("nextqa", output_dir=tmp_path, batch_size=3)]
    assert main([*flags, "--resume", str(NEXTQA)]) == 0
    written = (tmp_path / "predictions_val.jsonl").read_text()
    capsys.readouterr()
    assert main(flags) == 2
    assert "--untrained" in one_line(capsys)
    assert main([*flags, "--resume", str(NEXTQA)]) == 2
    assert "--overwrite" in one_line(capsys)
    assert main([*flags, "--untrained", "--overwrite"]) == 0
    assert (tmp_path / "predictions_val.jsonl").read_text() != written  # replaced, as asked


# ---------------------------------------------------------------------------- errors in words


@pytest.mark.parametrize("content, says", [(b"not a checkpoint\n", "not a PyTorch file"),
                                           (b"", "is empty (0 bytes)")])
def test_unreadable_checkpoints_say_what_is_wrong(tmp_path, capsys, content, says):
    bad = tmp_path / "notackpt.txt"
    bad.write_bytes(content)
    assert main(["eval", *case_flags("nextqa", output_dir=tmp_path / "out"), "--resume", str(bad)]) == 2
    err = one_line(capsys)
    assert str(bad) in err and says in err


def test_a_missing_data_path_is_named(tmp_path, capsys):
    assert main(["data", "check", "--dataset", "mine", "--data_path", str(tmp_path / "nowhere"),
                 "--tokenizer_path", str(ASSETS / "tokenizer.model")]) == 2
    err = one_line(capsys)
    assert "--data_path folder not found" in err and "nowhere" in err


def test_no_arguments_name_the_backbone_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./pretrained/llama here
    assert main(["train"]) == 2
    err = one_line(capsys)
    assert "--llama_model_path" in err and "--tokenizer_path" in err


def test_a_mistyped_flag_names_the_command_and_the_closest_flag(capsys):
    assert main(["eval", "--dtpe", "bf16"]) == 2
    err = one_line(capsys)
    assert err.startswith("flipvqa eval: error:") and "did you mean --dtype?" in err


def test_a_bad_value_is_one_line_without_the_usage_block(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--batch_size", "abc"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch_size" in err and "'abc'" in err and "usage:" not in err


# Simulates a missing package (or a Ctrl-C at a given import) in a fresh interpreter.
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            {action}
sys.meta_path.insert(0, Block())
from flipvqa.cli import build_parser, main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_help_without_the_serve_extra():
    missing = BLOCK.format(blocked={"fastapi", "uvicorn", "python_multipart", "multipart"},
                           action="raise ModuleNotFoundError(name, name=name)")
    helped = run_python(missing, "serve", "--help")
    assert helped.returncode == 0 and "--token" in helped.stdout, helped.stderr
    served = run_python(missing, "serve")
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert "pip install 'flipvqa[serve]'" in served.stderr and served.stderr.count("\n") == 1, served.stderr


def test_ctrl_c_while_torch_imports_is_one_line():
    interrupted = run_python(BLOCK.format(blocked={"torch"}, action="raise KeyboardInterrupt"), "train")
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.strip() == "flipvqa: interrupted"


# ---------------------------------------------------------------------------- help texts


def helps(command: str) -> dict[str, str]:
    """Each flag's help text as ``flipvqa COMMAND --help`` shows it."""
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {flag: " ".join((a.help or "").split()) for a in sub._actions for flag in a.option_strings}


def test_help_texts_say_what_each_command_does_with_a_flag():
    train, ev, ask, serve = helps("train"), helps("eval"), helps("ask"), helps("serve")
    for command in (train, ev, ask, serve):
        assert not [flag for flag, text in command.items() if "(default: )" in text]
    assert ev["--resume"] != train["--resume"]
    assert "the checkpoint" in ev["--resume"] and "demo" in serve["--resume"]
    for command in (ev, ask):  # the checkpoint supplies them: no 7B or 512 as if they were the defaults
        assert "(default: 7B)" not in command["--model"] and "checkpoint" in command["--model"]
        assert "(default: 512)" not in command["--max_seq_len"] and "checkpoint" in command["--max_seq_len"]
    assert "demo model" in serve["--model"]
    assert "question" in ask["--question"]


# ---------------------------------------------------------------------------- data check


def test_data_check_groups_errors_of_one_kind(tmp_path):
    root = tmp_path / "data" / "many"
    root.mkdir(parents=True)
    torch.save({f"v{k}": torch.zeros(3, 768).half() for k in range(12)}, root / "features.pth")
    rows = [{"video": f"v{k}", "question": f"why did the boy run {k}", "options": ["a", "b", "c"], "answer": 1}
            for k in range(12)]
    for split in ("train", "val"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check = [sys.executable, "-m", "flipvqa", "data", "check", "-q", "--dataset", "many", "--data_path",
             str(root.parent), "--max_seq_len", "20", "--tokenizer_path", str(ASSETS / "tokenizer.model"),
             "--model", "nowhere", "--llama_model_path", "nowhere"]
    text = subprocess.run(check, capture_output=True, text=True, timeout=300)
    full = json.loads(subprocess.run([*check, "--json"], capture_output=True, text=True, timeout=300).stdout)
    assert text.returncode == 2 and len(full["errors"]) == 24  # every question of both splits
    numbered = [line for line in text.stdout.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert len(numbered) == 2, text.stdout  # one line per split's kind of error
    assert "[and 11 more of this kind, e.g. question 1 (video v1)" in numbered[0]
    assert text.stdout.splitlines()[-1] == "24 errors"


# ---------------------------------------------------------------------------- noise and docs


NOISE = ("Failed to load", "_pytree", "triton", "font cache")


def test_loading_a_frame_encoder_prints_no_third_party_noise(tiny_clip):  # noqa: F811
    loaded = run_python("""
        import sys
        from flipvqa.features.clip import load_encoder
        load_encoder(sys.argv[1], "cpu")
        import logging; logging.getLogger("torchao").warning("a real warning")
        """, str(tiny_clip))
    assert loaded.returncode == 0, loaded.stderr
    assert not [word for word in NOISE if word in loaded.stderr], loaded.stderr
    assert "a real warning" in loaded.stderr  # silenced during the import only


def test_matplotlibs_font_cache_note_is_kept_out(tmp_path):
    # matplotlib logs the note when building its cache takes over 5 s: a timer that fires at once
    drawn = run_python("""
        import threading
        class Now:
            def __init__(self, delay, note): self.note = note
            def start(self): self.note()
            def cancel(self): pass
        threading.Timer = Now
        import flipvqa.explain
        """, env={**__import__("os").environ, "MPLCONFIGDIR": str(tmp_path)})
    assert drawn.returncode == 0 and "font cache" not in drawn.stderr, drawn.stderr


def test_the_readme_says_how_many_options_the_tiny_dataset_has():
    script = runpy.run_path(str(ROOT / "scripts" / "make_tiny_dataset.py"))
    rng = random.Random(0)
    counts = {len(q["options"]) for _ in range(200) for q in script["questions"](rng, "v", "red", "stays still", 4)}
    said = re.search(r"make_tiny_dataset\.py` writes a few generated videos, questions with (\d+) (?:to|or) (\d+) "
                     r"options", " ".join((ROOT / "README.md").read_text().split()))
    assert said and counts == set(range(int(said.group(1)), int(said.group(2)) + 1)), (said, counts)
