"""``flipvqa ask`` and the Answerer API, end to end on a generated video."""

import json

import pytest
import torch

from flipvqa.cli import main

from conftest import REF, case_dir

pytest.importorskip("av")
pytest.importorskip("transformers")
from test_features import make_video, tiny_clip  # noqa: E402,F401  (the fixture is reused)

CHECKPOINT = case_dir("nextqa") / "checkpoint.pth"
BACKBONE = ["--llama_model_path", str(REF / "llama"), "--model", "tiny", "--adapter_layer", "2", "--max_seq_len", "128"]


def test_ask_ranks_choices_and_explains(tmp_path, tiny_clip, capsys):
    video = make_video(tmp_path / "clip.mp4", 100, noise=True)  # 4 s: 4 frames at 1 fps
    png = tmp_path / "why.png"
    status = main(["ask", str(video), "--question", "what happens first", "--choices", "a dog runs",
                   "a cat sleeps", "a man cooks", "--resume", str(CHECKPOINT), "--clip_model", str(tiny_clip),
                   "--explain", str(png), "--json", "--device", "cpu", *BACKBONE])
    assert status == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    probs = [r["probability"] for r in answer["ranked"]]
    assert sorted(probs, reverse=True) == probs and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert answer["choice"] == answer["ranked"][0]["choice"] and answer["n_frames"] == 4
    assert len(answer["frame_attention"]) == 10 and all(a >= 0 for a in answer["frame_attention"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size[0] >= 640


def test_answerer_scores_equal_evaluation(tmp_path):
    """The API ranks with the same scores as evaluation does for the same features and text."""
    from flipvqa import data
    from flipvqa.ask import Answerer

    records = data.load_split(case_dir("nextqa") / "data", "nextqa", "val")
    rec = records[0]
    expected = json.loads((case_dir("nextqa") / "expected.json").read_text())
    want = expected["val"]["batches"][0]["scores"][0]
    answerer = Answerer(CHECKPOINT, device="cpu", llama_model_path=str(REF / "llama"), model="tiny",
                        adapter_layer=2, max_seq_len=128)
    answer = answerer.ask(rec.frames.float(), rec.question, rec.options)
    got = {choice: score for choice, _, score in answer.ranked}
    assert [got[o] for o in rec.options] == pytest.approx(want, abs=1e-4)
    probs = torch.softmax(-torch.tensor(want), 0)
    assert answer.ranked[0][1] == pytest.approx(probs.max().item(), abs=1e-4)


def test_ask_needs_a_clip_model_for_a_video(tmp_path, capsys):
    video = make_video(tmp_path / "clip.mp4", 30)
    status = main(["ask", str(video), "--question", "why", "--choices", "a", "b", "--resume", str(CHECKPOINT),
                   "--device", "cpu", *BACKBONE])
    assert status == 2 and "--clip_model" in capsys.readouterr().err


@pytest.mark.slow  # trains the --quick demo first
def test_ask_on_the_demo_model_with_a_generated_video(tmp_path, tiny_clip, capsys):
    """The demo's backbone and checkpoint (a --quick run) answer about a video file."""
    assert main(["-q", "demo", "--quick", "--output_dir", str(tmp_path / "demo")]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "demo" / "flipped-vqa" / "checkpoint_best.pth"
    video = make_video(tmp_path / "clip.mp4", 150, noise=True)  # 6 s
    png = tmp_path / "explain.png"
    choices = ["cooking", "dancing", "running", "swimming", "sleeping"]
    assert main(["ask", str(video), "--question", "what does the person do at the end of the video?",
                 "--choices", *choices, "--resume", str(checkpoint), "--clip_model", str(tiny_clip),
                 "--explain", str(png), "--json", "--device", "cpu"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["n_frames"] == 6 and {r["choice"] for r in answer["ranked"]} == set(choices)
    assert png.read_bytes()[:4] == b"\x89PNG"
