"""Tests for ``flipvqa extract-features``: frame selection, geometry, normalisation, CLIP, output.

Videos are written with PyAV into tmp_path; the CLIP model is a tiny random one made with
transformers, so nothing touches the network. Each frame's colour encodes its index
(red = units, green = tens, in steps of 20 levels to survive lossy encoding), so a test can tell
which source frame a sampled frame came from.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("PIL")

from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.features import clip, extract, video  # noqa: E402
from flipvqa.features.collect import assign_ids, collect_videos  # noqa: E402
from flipvqa.features.extract import add_arguments, extract_features, run  # noqa: E402
from flipvqa.features.video import output_geometry, preprocess, sample_frames, select_slots  # noqa: E402

# --------------------------------------------------------------------------- helpers


def index_colour(i: int) -> tuple[int, int, int]:
    return 30 + 20 * (i % 10), 30 + 20 * (i // 10), 128


def colour_index(frame: np.ndarray) -> int:
    """Recover the source frame index from the centre of a (uniformly coloured) frame."""
    cy, cx = frame.shape[0] // 2, frame.shape[1] // 2
    r, g, _ = frame[cy - 4 : cy + 4, cx - 4 : cx + 4].reshape(-1, 3).mean(0)
    return round((r - 30) / 20) + 10 * round((g - 30) / 20)


def make_video(
    path: Path, n_frames: int, rate: int = 25, size: tuple[int, int] = (64, 48), noise: bool = False
) -> Path:
    """Write an mp4 (MPEG-4 part 2, near-lossless) whose frame ``i`` is coloured ``index_colour(i)``,
    or, with ``noise``, random pixels (to check resize/crop geometry)."""
    width, height = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(n_frames):
            if noise:
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                pixels = np.empty((height, width, 3), np.uint8)
                pixels[:] = index_colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def ffmpeg_rule(n_frames: int, rate: int, fps: float) -> list[int]:
    """The source index shown in each slot, straight from the rule: a frame at t falls in slot
    round_half_up(t*fps); slot k shows the last frame with slot <= k; round(end*fps) slots."""
    slot = [math.floor(Fraction(i, rate) * Fraction(fps) + Fraction(1, 2)) for i in range(n_frames)]
    count = math.floor(Fraction(n_frames, rate) * Fraction(fps) + Fraction(1, 2))
    return [max((i for i in range(n_frames) if slot[i] <= k), default=0) for k in range(count)]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPVisionModelWithProjection (768-d output) saved to a folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=768,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- frame selection


def _timed(n: int, rate: int, start: int = 0) -> list[tuple[Fraction, Fraction, int]]:
    return [(Fraction(i + start, rate), Fraction(1, rate), i) for i in range(n)]


def test_select_slots_picks_last_frame_of_each_slot() -> None:
    # 25 fps, 4 s, fps 1: slot k shows the frame at k + 0.48 s, not the one at k s.
    assert list(select_slots(_timed(100, 25), 1)) == [12, 37, 62, 87]
    for n, rate, fps in [(100, 25, 3), (75, 25, 1), (75, 25, 3), (90, 30, 1), (61, 24, 2), (7, 2, 1)]:
        assert list(select_slots(_timed(n, rate), fps)) == ffmpeg_rule(n, rate, fps), (n, rate, fps)


def test_select_slots_rounds_half_away_from_zero() -> None:
    # 30 fps: the frame at exactly 0.5 s (index 15) belongs to slot 1, so slot 0 shows frame 14.
    assert list(select_slots(_timed(60, 30), 1)) == [14, 44]
    # 10 frames at 4 fps end at 2.5 s: round(2.5) = 3 slots (Python's round would give 2).
    assert len(list(select_slots(_timed(10, 4), 1))) == 3


def test_select_slots_edge_cases() -> None:
    assert list(select_slots(_timed(2, 1), 3)) == [0, 0, 0, 1, 1, 1]  # slow source: frames repeat
    assert list(select_slots(_timed(10, 25), 1)) == []  # 0.4 s: round(0.4) = 0 slots
    assert list(select_slots([], 1)) == []
    # Frames from 1 s on: slot 0 (before the first frame) shows the first frame.
    assert list(select_slots(_timed(50, 25, start=25), 1)) == [0, 12, 37]


# --------------------------------------------------------------------------- geometry and pixels


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((64, 48), (298, 224, 37, 0)),  # landscape: height -> 224, width int(64*224/48)
        ((48, 64), (224, 298, 0, 37)),  # portrait
        ((100, 100), (224, 224, 0, 0)),
        ((1920, 1080), (398, 224, 87, 0)),
        ((57, 101), (224, 396, 0, 86)),  # odd sizes: int() truncation everywhere
    ],
)
def test_output_geometry(size: tuple[int, int], expected: tuple[int, int, int, int]) -> None:
    assert output_geometry(*size) == expected


def test_preprocess_normalises_like_clip() -> None:
    frames = np.zeros((2, 224, 224, 3), np.uint8)
    frames[1] = 255
    pixels = preprocess(frames)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    mean, std = torch.tensor(video.CLIP_MEAN), torch.tensor(video.CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 5, 7], -mean / (std + 1e-8))
    torch.testing.assert_close(pixels[1, :, 100, 3], (1 - mean) / (std + 1e-8))


# --------------------------------------------------------------------------- decoding real files


@pytest.mark.parametrize("fps", [1, 3])
def test_sample_frames_follows_the_ffmpeg_fps_rule(tmp_path: Path, fps: int) -> None:
    path = make_video(tmp_path / "clip.mp4", 75)  # 3 s at 25 fps
    frames = sample_frames(path, fps)
    assert frames.shape == (3 * fps, 224, 224, 3) and frames.dtype == np.uint8
    picked = [colour_index(f) for f in frames]
    assert picked == ffmpeg_rule(75, 25, fps)
    if fps == 1:
        assert picked == [12, 37, 62]


def ffmpeg_fps_filter(path: Path, fps: float) -> list[int]:
    """Source indices picked by ffmpeg's own ``fps`` filter (PyAV's bundled libavfilter)."""
    picked = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        source, fps_filter, sink = (
            graph.add_buffer(template=stream),
            graph.add("fps", f"fps={fps}"),
            graph.add("buffersink"),
        )
        source.link_to(fps_filter)
        fps_filter.link_to(sink)
        graph.configure()
        for frame in [*container.decode(stream), None]:  # None = end of stream
            graph.push(frame)
            while True:
                try:
                    picked.append(colour_index(graph.pull().to_ndarray(format="rgb24")))
                except (av.BlockingIOError, av.EOFError):
                    break
    return picked


@pytest.mark.parametrize(("n_frames", "rate", "fps"), [(110, 25, 1), (90, 30, 1), (100, 30, 3), (10, 4, 1)])
def test_sample_frames_agrees_with_ffmpeg_fps_filter(
    tmp_path: Path, n_frames: int, rate: int, fps: int
) -> None:
    path = make_video(tmp_path / "clip.mp4", n_frames, rate=rate)
    expected = ffmpeg_fps_filter(path, fps)
    assert expected == ffmpeg_rule(n_frames, rate, fps)
    assert [colour_index(f) for f in sample_frames(path, fps)] == expected


@pytest.mark.parametrize("size", [(48, 80), (80, 48)])
def test_sample_frames_resizes_and_crops_like_the_extractor(tmp_path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    path = make_video(tmp_path / "noise.mp4", 50, size=size, noise=True)
    with av.open(str(path)) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    # Reference written out longhand: short side to 224 (bicubic), then the centre crop.
    width, height = size
    scaled = (224, int(height * 224 / width)) if height >= width else (int(width * 224 / height), 224)
    x, y = int((scaled[0] - 224) / 2), int((scaled[1] - 224) / 2)
    expected = [
        np.asarray(decoded[i].resize(scaled, Image.Resampling.BICUBIC).crop((x, y, x + 224, y + 224)))
        for i in (12, 37)
    ]
    np.testing.assert_array_equal(sample_frames(path, 1), np.stack(expected))


def test_sample_frames_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(FlipVQAError, match=re.escape("bad.mp4")):
        sample_frames(bad, 1)


# --------------------------------------------------------------------------- finding videos and ids


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
    real = extract.sample_frames
    monkeypatch.setattr(
        extract, "sample_frames", lambda path, fps: decoded.append(Path(path).name) or real(path, fps)
    )
    summary = extract_features([videos], tiny_clip, output, device="cpu")
    assert decoded == ["b.mp4"]
    assert summary["skipped_existing"] == 1 and summary["extracted"] == 1
    features = torch.load(output, weights_only=True)
    assert set(features) == {"a", "b"} and torch.equal(features["a"], first)

    decoded.clear()  # everything done: nothing decoded, the model not even loaded
    monkeypatch.setattr(extract, "load_clip", lambda *a: pytest.fail("model loaded with nothing to do"))
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
    real = extract.sample_frames

    def interrupt_at_c(path: Path, fps: float) -> np.ndarray:
        if Path(path).stem == "c":
            raise KeyboardInterrupt
        return real(path, fps)

    monkeypatch.setattr(extract, "sample_frames", interrupt_at_c)
    output = tmp_path / "feats.pth"
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            sorted(tmp_path.glob("*.mp4")), tiny_clip, output, batch_size=1, device="cpu", workers=1
        )
    assert set(torch.load(output, weights_only=True)) == {"a", "b"}
