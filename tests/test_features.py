"""Tests for the video decoding of ``flipvqa extract-features``: frame selection, geometry,
normalisation (the rest is in test_features_extract.py, which reuses the helpers here).

Videos are written with PyAV into tmp_path; the CLIP model is a tiny random one made with
transformers, so nothing touches the network. Each frame's colour encodes its index
(red = units, green = tens, in steps of 20 levels to survive lossy encoding), so a test can tell
which source frame a sampled frame came from.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("PIL")

from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.features import video  # noqa: E402
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
