"""Tests for ``flipvqa extract-features`` after decoding: finding the videos, the CLIP encoder,
the extraction loop, resuming and its command line. The videos and the tiny random CLIP model come
from the helpers of test_features.py."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("PIL")

from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.features import clip, extract  # noqa: E402
from flipvqa.features.collect import assign_ids, collect_videos  # noqa: E402
from flipvqa.features.extract import add_arguments, extract_features, run  # noqa: E402
from flipvqa.features.video import preprocess, sample_frames  # noqa: E402

from test_features import make_video, tiny_clip  # noqa: E402,F401  (the fixture is reused)


def test_collect_videos_from_folder_list_and_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "v" / "sub").mkdir(parents=True)
    for name in ["v/a.mp4", "v/sub/b.MKV", "v/notes.txt", "c.avi"]:
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("# videos\nc.avi\n\nv/a.mp4\n")
    monkeypatch.chdir(tmp_path / "v")  # list entries are relative to the list's folder here
    assert collect_videos([tmp_path / "v"]) == [tmp_path / "v/a.mp4", tmp_path / "v/sub/b.MKV"]
    assert collect_videos([listing]) == [tmp_path / "c.avi", tmp_path / "v/a.mp4"]
    assert [p.name for p in collect_videos([str(tmp_path / "*.avi"), str(tmp_path / "c.avi")])] == ["c.avi"]
    with pytest.raises(FlipVQAError, match=re.escape("missing.mp4")):
        collect_videos([tmp_path / "missing.mp4"])
    listing.write_text("gone.mp4\n")
    with pytest.raises(FlipVQAError, match=re.escape("list.txt:1")):
        collect_videos([listing])


def test_duplicate_ids_name_both_paths(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "x.mp4", tmp_path / "b" / "x.avi"
    with pytest.raises(FlipVQAError) as err:
        assign_ids([first, second])
    assert str(first) in str(err.value) and str(second) in str(err.value)
    assert set(assign_ids([first, second], "name")) == {"x.mp4", "x.avi"}


# --------------------------------------------------------------------------- CLIP and the output file


def test_extract_features_matches_direct_model_call(tmp_path: Path, tiny_clip: Path) -> None:
    make_video(tmp_path / "short.mp4", 75)
    make_video(tmp_path / "long.mp4", 110, size=(48, 64))
    output = tmp_path / "out" / "feats.pth"
    # batch_size 4 splits videos across batches and mixes two videos in one batch.
    summary = extract_features([tmp_path], tiny_clip, output, fps=1, batch_size=4, device="cpu")
    assert summary["extracted"] == 2 and summary["failed"] == [] and summary["skipped_existing"] == 0
    features = torch.load(output, weights_only=True)
    assert set(features) == {"short", "long"}
    model = clip.load_clip(tiny_clip, "cpu")
    for video_id, n in [("short", 3), ("long", 4)]:
        assert features[video_id].shape == (n, 768) and features[video_id].dtype == torch.float16
        with torch.inference_mode():
            direct = model(
                pixel_values=preprocess(sample_frames(tmp_path / f"{video_id}.mp4", 1))
            ).image_embeds
        torch.testing.assert_close(features[video_id], direct.half(), rtol=2e-3, atol=2e-3)
    assert not list(output.parent.glob("*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_load_clip_from_full_clip_folder(tmp_path: Path) -> None:
    """A released CLIP folder holds the full model: the vision tower + projection must load intact."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=768,
    )
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = full.get_image_features(pixel_values=pixels)  # CLIP's encode_image
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        got = clip.load_clip(tmp_path, "cpu")(pixel_values=pixels).image_embeds
    assert got.shape == (2, 768)
    torch.testing.assert_close(got, expected)


def test_load_clip_errors_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(FlipVQAError, match="no such CLIP model folder"):
        clip.load_clip(tmp_path / "nowhere", "cpu")
    with pytest.raises(FlipVQAError, match="cannot load"):
        clip.load_clip(tmp_path, "cpu")  # an empty folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlipVQAError, match="local folder"):  # an id never in any cache: fails at once
        clip.load_clip("flipvqa-tests/no-such-model", "cpu")


def test_resume_skips_finished_videos(
    tmp_path: Path, tiny_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", 50)
    output = tmp_path / "feats.pth"
    extract_features([videos], tiny_clip, output, device="cpu")
    first = torch.load(output, weights_only=True)["a"]

    make_video(videos / "b.mp4", 50)
    decoded: list[str] = []
    real = extract.iter_frames
    monkeypatch.setattr(
        extract, "iter_frames", lambda path, *a, **k: decoded.append(Path(path).name) or real(path, *a, **k)
    )
    summary = extract_features([videos], tiny_clip, output, device="cpu")
    assert decoded == ["b.mp4"]
    assert summary["skipped_existing"] == 1 and summary["extracted"] == 1
    features = torch.load(output, weights_only=True)
    assert set(features) == {"a", "b"} and torch.equal(features["a"], first)

    decoded.clear()  # everything done: nothing decoded, the model not even loaded
    monkeypatch.setattr(clip, "load_encoder", lambda *a: pytest.fail("model loaded with nothing to do"))
    assert extract_features([videos], tiny_clip, output)["skipped_existing"] == 2 and decoded == []


def test_corrupt_video_is_skipped_and_reported(
    tmp_path: Path, tiny_clip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "good.mp4", 50)
    (videos / "broken.mp4").write_bytes(
        np.random.default_rng(2).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    )
    make_video(videos / "blink.mp4", 5)  # 0.2 s: no frame at fps 1
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    output = tmp_path / "feats.pth"
    args = parser.parse_args(
        [str(videos), "--output", str(output), "--clip_model", str(tiny_clip), "--device", "cpu"]
    )
    assert run(args) == 1  # some videos failed: the command fails, after writing the good one
    printed = capsys.readouterr().out
    assert "extracted 1 videos" in printed and "2 failed" in printed
    assert "broken" in printed and "blink" in printed
    assert set(torch.load(output, weights_only=True)) == {"good"}
    assert run(args) == 1  # resumed: good is already there, the broken ones are listed again
    assert "1 already there, 2 failed" in capsys.readouterr().out

    args = parser.parse_args(
        [str(videos / "broken.mp4"), "--output", str(tmp_path / "none.pth"), "--clip_model", str(tiny_clip)]
    )
    assert run(args) == 1  # nothing extracted at all
    assert "failed broken (" in capsys.readouterr().out
    assert not (tmp_path / "none.pth").exists()


def test_cli_exits_non_zero_when_a_video_failed(tmp_path: Path, tiny_clip: Path) -> None:
    """Through the real command: the good video is written, the corrupt one listed, exit status 1."""
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "good.mp4", 50)
    (videos / "corrupt.mp4").write_bytes(
        np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    )
    output = tmp_path / "feats.pth"
    command = [sys.executable, "-m", "flipvqa", "extract-features", str(videos), "--output", str(output),
               "--clip_model", str(tiny_clip), "--device", "cpu", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "extracted 1 videos, 0 already there, 1 failed" in done.stdout
    assert f"failed corrupt ({videos / 'corrupt.mp4'})" in done.stdout
    assert "corrupt.mp4: skipped" in done.stderr and "extract-features:" not in done.stderr  # -q: no bar
    assert set(torch.load(output, weights_only=True)) == {"good"}


def test_unreadable_existing_output_is_a_user_error(tmp_path: Path, tiny_clip: Path) -> None:
    make_video(tmp_path / "a.mp4", 30)
    output = tmp_path / "feats.pth"
    output.write_text("not a torch file")
    with pytest.raises(FlipVQAError, match=re.escape("feats.pth")):
        extract_features([tmp_path / "a.mp4"], tiny_clip, output, device="cpu")


def test_interrupted_run_keeps_finished_videos(
    tmp_path: Path, tiny_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in "abc":
        make_video(tmp_path / f"{name}.mp4", 30)
    real = extract.iter_frames

    def interrupt_at_c(path: Path, fps: float, crop: bool = True) -> Iterator[np.ndarray]:
        if Path(path).stem == "c":
            raise KeyboardInterrupt
        return real(path, fps, crop)

    monkeypatch.setattr(extract, "iter_frames", interrupt_at_c)
    output = tmp_path / "feats.pth"
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            sorted(tmp_path.glob("*.mp4")), tiny_clip, output, batch_size=1, device="cpu", workers=1
        )
    assert set(torch.load(output, weights_only=True)) == {"a", "b"}
