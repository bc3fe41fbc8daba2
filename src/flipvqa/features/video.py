"""Decode a video into the CLIP input frames used by the released features.

The released features were extracted by FrozenBiLM's extractor, which piped each video through
``ffmpeg -vf fps=F,scale=W:H,crop=224:224:x:y``. This module reproduces that pipeline with PyAV and
PIL so no ffmpeg binary is needed:

* frame selection follows ffmpeg's ``fps`` filter (rounding ``near``), see :func:`select_slots`;
* the frame is scaled so its short side is 224 (bicubic) and centre-cropped to 224x224, see
  :func:`output_geometry`;
* pixels are scaled to [0, 1] and normalised with CLIP's mean and std, see :func:`preprocess`.

Encoders with their own image processor (SigLIP, :mod:`flipvqa.features.clip`) take the same
selected frames uncropped (``iter_frames(..., crop=False)``) and resize them their own way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

from flipvqa.errors import FlipVQAError

log = logging.getLogger(__name__)

SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

T = TypeVar("T")


def _round_near(x: Fraction) -> int:
    """Round half away from zero, like ffmpeg's ``AV_ROUND_NEAR_INF`` (Python's round() is half-even)."""
    return math.floor(x + Fraction(1, 2)) if x >= 0 else -math.floor(-x + Fraction(1, 2))


def select_slots(frames: Iterable[tuple[Fraction, Fraction, T]], fps: float) -> Iterator[T]:
    """Yield one item per output slot of ffmpeg's ``fps`` filter, streaming.

    ``frames`` yields ``(time, duration, item)`` in presentation order, times in seconds from the
    stream start. A frame at time ``t`` falls in slot ``round_near(t * fps)``; slot ``k`` shows the
    last frame whose slot is ``<= k`` (so at 25 fps and fps 1 slot 0 is the frame at 0.48 s, not the
    one at 0 s); the number of slots is ``round_near(end * fps)`` with ``end`` = last time + duration.
    Slots before the first frame's slot show the first frame. Only one pending item is held, so a
    long video never sits in memory. Exact fractions avoid float ties (e.g. 15/30 s at fps 1).
    """
    rate = Fraction(fps).limit_denominator(1_000_000)
    next_slot = 0
    held: list[T] = []  # the last frame seen (empty before the first one)
    end = Fraction(0)
    for time, duration, item in frames:
        slot = _round_near(time * rate)
        if held:
            # Every slot before this frame's slot is final: its last frame is the held one.
            for _ in range(next_slot, slot):
                yield held[0]
            next_slot = max(next_slot, slot)
        # An out-of-order (earlier) frame simply replaces the held one, as in ffmpeg.
        held = [item]
        end = max(end, time + duration)
    if held:
        for _ in range(next_slot, _round_near(end * rate)):
            yield held[0]


def output_geometry(width: int, height: int) -> tuple[int, int, int, int]:
    """Return ``(W, H, x, y)``: the scaled size and the top-left corner of the 224x224 crop.

    The short side becomes 224 and the long side is truncated (``int``), exactly as the extractor
    computed the ffmpeg ``scale`` arguments; the crop offsets are truncated halves of the excess.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"bad frame size {width}x{height}")
    scaled = (SIZE, int(height * SIZE / width)) if height >= width else (int(width * SIZE / height), SIZE)
    return scaled[0], scaled[1], int((scaled[0] - SIZE) / 2), int((scaled[1] - SIZE) / 2)


def import_av() -> ModuleType:
    """Import PyAV, turning its absence into a user error (it is only needed to decode videos)."""
    try:
        import av
    except ImportError as err:
        raise FlipVQAError(f"decoding videos needs PyAV: `pip install av` ({err})") from err
    return av


def iter_frames(path: str | Path, fps: float, crop: bool = True) -> Iterator[np.ndarray]:
    """Yield the selected frames of ``path`` as uint8 arrays ``[224, 224, 3]`` (RGB), in one pass.

    With ``crop=False`` the frames come as decoded, ``[height, width, 3]``: the selection is the
    same, only the short-side-224 resize and centre crop are left to the encoder's own processor.
    Decoding errors inside the stream are skipped and a read error ends the stream, as the ffmpeg
    command line did for the released features; an unreadable file raises :class:`FlipVQAError`.
    """
    av = import_av()
    from PIL import Image  # PyAV's to_image() needs Pillow anyway

    if fps <= 0:
        raise FlipVQAError(f"{path}: --fps must be positive, got {fps}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise FlipVQAError(f"{path}: cannot open video ({getattr(err, 'strerror', None) or err})") from err
    with container:
        if not container.streams.video:
            raise FlipVQAError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: decoding every frame is the slow part
        # The stored size, ignoring the sample aspect ratio, as the extractor's ffprobe call did.
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        default_duration = 1 / Fraction(rate)
        last: list[Any] = [None, None]  # [frame, its RGB crop]

        def to_rgb(frame: av.VideoFrame) -> np.ndarray:
            # A frame repeated over several slots (low-fps source) is converted only once. Compare by
            # identity while holding the frame, so a recycled id() can never return a stale crop.
            if last[0] is not frame and not crop:
                last[:] = [frame, frame.to_ndarray(format="rgb24")]
            elif last[0] is not frame:
                w, h = (width, height) if width and height else (frame.width, frame.height)
                scaled_w, scaled_h, x, y = output_geometry(w, h)
                image = frame.to_image().resize((scaled_w, scaled_h), Image.Resampling.BICUBIC)
                last[:] = [frame, np.asarray(image.crop((x, y, x + SIZE, y + SIZE)), dtype=np.uint8)]
            return last[1]

        for frame in select_slots(_timed_frames(container, stream, default_duration, path), fps):
            yield to_rgb(frame)


def _timed_frames(
    container: Any, stream: Any, default_duration: Fraction, path: str | Path
) -> Iterator[tuple[Fraction, Fraction, Any]]:
    """Yield ``(time, duration, frame)`` for every decodable frame, times from the stream start."""
    av = import_av()
    time_base = Fraction(stream.time_base)  # decoded frames carry the stream's time base
    start: int | None = stream.start_time
    previous_end = Fraction(0)
    bad_packets = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except (av.FFmpegError, OSError) as err:
            log.warning("%s: read error, keeping the frames decoded so far (%s)", path, err)
            break
        try:
            decoded = packet.decode()
        except av.FFmpegError as err:
            bad_packets += 1
            log.debug("%s: skipping undecodable packet (%s)", path, err)
            continue
        for frame in decoded:
            if frame.pts is None:  # no timestamp: assume it directly follows the previous frame
                time = previous_end
            else:
                if start is None:
                    start = frame.pts
                time = (frame.pts - start) * time_base
            duration = frame.duration * time_base if frame.duration else default_duration
            previous_end = time + duration
            yield time, duration, frame
    if bad_packets:
        log.warning("%s: %d undecodable packets skipped", path, bad_packets)


def sample_frames(path: str | Path, fps: float = 1) -> np.ndarray:
    """Decode ``path`` and return its selected, resized, cropped frames: uint8 ``[n, 224, 224, 3]``.

    ``n`` may be 0 (a video shorter than half a slot); the caller decides whether that is an error.
    """
    frames = list(iter_frames(path, fps))
    if not frames:
        return np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8)
    return np.stack(frames)


def preprocess(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 frames ``[n, 224, 224, 3]`` into CLIP's normalised input ``[n, 3, 224, 224]`` float32.

    Works on the tensor's device, so passing a uint8 tensor already on the GPU normalises there.
    The ``+ 1e-8`` on the std reproduces the extractor's normalisation exactly.
    """
    pixels = torch.as_tensor(frames)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [n, H, W, 3], got {tuple(pixels.shape)} {pixels.dtype}")
    pixels = pixels.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / (std + 1e-8)
