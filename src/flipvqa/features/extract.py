"""``flipvqa extract-features``: videos -> CLIP ViT-L/14 frame features, as FrozenBiLM released them.

The output is ``torch.save({video_id: float16 tensor [frames, 768]})``: one CLIP image embedding
(:func:`flipvqa.features.clip.embed`) per frame selected by :mod:`flipvqa.features.video`, for the
videos :mod:`flipvqa.features.collect` finds. This module is the extraction loop and the command.

Behaviour worth knowing:

* Frames from several videos share one CLIP batch, and videos are decoded by a few threads ahead of
  the model, so short videos do not leave the accelerator idle.
* Resume: an existing output file is loaded and the videos already in it are skipped. The file is
  rewritten atomically (temporary file + ``os.replace``) about once a minute, at the end, and when
  the run is interrupted, so a crash loses at most a minute of work and never the file.
* A video that cannot be decoded, or that yields no frame (shorter than half a slot), is skipped and
  listed at the end, after the others are written; :func:`run` then returns 1, so a script sees
  that the output is incomplete. It returns 0 only when no requested video failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from flipvqa.devices import resolve_device
from flipvqa.errors import FlipVQAError
from flipvqa.features.clip import DEFAULT_MODEL, embed, load_clip
from flipvqa.features.collect import VIDEO_IDS, assign_ids, collect_videos
from flipvqa.features.video import import_av, sample_frames
from flipvqa.io import first_line, load_tensors, progress, save_torch

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "clipvitl14.pth"
SAVE_EVERY_S = 60.0


# --------------------------------------------------------------------------- batching and the output


class _Batcher:
    """Packs frames of consecutive videos into full batches and hands back finished videos."""

    def __init__(self, model: torch.nn.Module, device: torch.device, batch_size: int) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.queue: deque[tuple[str, np.ndarray]] = deque()  # (video id, frames not yet embedded)
        self.buffered = 0
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.waiting: dict[str, int] = {}  # frames of each video still to embed

    def add(self, video_id: str, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """Queue a video's frames; return the videos completed by the full batches this allows."""
        self.queue.append((video_id, frames))
        self.parts[video_id], self.waiting[video_id] = [], len(frames)
        self.buffered += len(frames)
        done: dict[str, torch.Tensor] = {}
        while self.buffered >= self.batch_size:
            done.update(self._step(self.batch_size))
        return done

    def flush(self) -> dict[str, torch.Tensor]:
        """Embed whatever is queued (the last, partial batch) and return the completed videos."""
        done: dict[str, torch.Tensor] = {}
        while self.buffered:
            done.update(self._step(min(self.buffered, self.batch_size)))
        return done

    def _step(self, size: int) -> dict[str, torch.Tensor]:
        chunks, owners = [], []
        while size:
            video_id, frames = self.queue[0]
            take = min(size, len(frames))
            chunks.append(frames[:take])
            owners.append((video_id, take))
            if take == len(frames):
                self.queue.popleft()
            else:
                self.queue[0] = (video_id, frames[take:])
            size -= take
        batch = np.concatenate(chunks)
        self.buffered -= len(batch)
        embeds = embed(self.model, batch, self.device)
        done = {}
        for (video_id, take), part in zip(owners, embeds.split([take for _, take in owners]), strict=True):
            self.parts[video_id].append(part)
            self.waiting[video_id] -= take
            if not self.waiting[video_id]:
                del self.waiting[video_id]
                # torch.cat copies, so no video keeps (and torch.save writes) the whole batch's storage.
                done[video_id] = torch.cat(self.parts.pop(video_id))
        return done


def load_existing(output: Path) -> dict[str, torch.Tensor]:
    """Load an earlier (possibly partial) output file to resume from; absent means empty."""
    if not output.exists():
        return {}
    if output.is_dir():
        raise FlipVQAError(f"{output}: --output is a folder, expected a .pth file path")
    try:  # not memory-mapped: the file is replaced while its tensors are still in use
        features = load_tensors(output, "the existing output to resume", mmap=False)
    except FlipVQAError as err:
        raise FlipVQAError(f"{err}; move it away") from err
    if not isinstance(features, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in features.items()
    ):
        raise FlipVQAError(f"{output}: existing output is not a {{video_id: tensor}} dict; move it away")
    return features


def _decode(path: Path, fps: float) -> np.ndarray | str:
    """Sample a video's frames; an unreadable video gives the reason as a string instead."""
    av = import_av()
    try:
        frames = sample_frames(path, fps)
    except (FlipVQAError, av.FFmpegError, OSError, ValueError) as err:
        return first_line(err).removeprefix(f"{path}: ")  # the summary names the path already
    return frames if len(frames) else "no frames (shorter than one output frame?)"


def _decoded_ahead(
    todo: Sequence[tuple[str, Path]], fps: float, workers: int
) -> Iterator[tuple[str, Path, np.ndarray | str]]:
    """Yield ``(id, path, frames or failure)`` in order, decoding a few videos ahead in threads
    (PyAV and PIL release the GIL), with a bounded look-ahead to bound memory."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque[tuple[str, Path, Future]] = deque()
    try:
        for video_id, path in todo:
            pending.append((video_id, path, pool.submit(_decode, path, fps)))
            if len(pending) > 2 * workers:
                video_id, path, future = pending.popleft()
                yield video_id, path, future.result()
        while pending:
            video_id, path, future = pending.popleft()
            yield video_id, path, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def extract_features(
    paths: str | Path | Sequence[str | Path],
    clip_model: str | Path | torch.nn.Module,
    output: str | Path,
    fps: float = 1,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    video_id: str = "stem",
    workers: int | None = None,
) -> dict[str, Any]:
    """Extract CLIP features for ``paths`` (files, folders, ``.txt`` lists, globs) into ``output``.

    ``clip_model`` is a folder, a hub id, or a model already returned by :func:`load_clip`.
    Returns ``{"extracted": int, "skipped_existing": int, "failed": [(video_id, path, reason)],
    "output": Path}``.
    """
    if fps <= 0:
        raise FlipVQAError(f"--fps must be positive, got {fps}")
    if batch_size < 1:
        raise FlipVQAError(f"--batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise FlipVQAError(f"--workers must be at least 1, got {workers}")
    import_av()  # fail once, up front, rather than once per video
    output = Path(output).expanduser()
    ids = assign_ids(collect_videos([paths] if isinstance(paths, (str, Path)) else paths), video_id)
    features = load_existing(output)
    todo = [(vid, path) for vid, path in ids.items() if vid not in features]
    summary: dict[str, Any] = {
        "extracted": 0,
        "skipped_existing": len(ids) - len(todo),
        "failed": [],
        "output": output,
    }
    if summary["skipped_existing"]:
        log.info(
            "%s: resuming, %d of %d videos already extracted", output, summary["skipped_existing"], len(ids)
        )
    if not todo:
        return summary

    target = resolve_device(device)
    model = (
        clip_model.to(target).eval()
        if isinstance(clip_model, torch.nn.Module)
        else load_clip(clip_model, target)
    )
    batcher = _Batcher(model, target, batch_size)
    workers = workers or min(4, os.cpu_count() or 1)
    saved_at, save_every = time.monotonic(), SAVE_EVERY_S
    unsaved = 0

    def finish(done: dict[str, torch.Tensor]) -> None:
        nonlocal unsaved
        features.update(done)
        summary["extracted"] += len(done)
        unsaved += len(done)

    try:
        # logging_redirect_tqdm: warnings about skipped videos print above the bar, not through it.
        # progress(): hidden by -q; leave=True keeps the finished bar above the summary, as before.
        with logging_redirect_tqdm(), progress(
            total=len(todo), unit="video", desc="extract-features", leave=True
        ) as bar:
            for vid, path, frames in _decoded_ahead(todo, fps, workers):
                if isinstance(frames, str):
                    log.warning("%s: skipped, %s", path, frames)
                    summary["failed"].append((vid, path, frames))
                else:
                    finish(batcher.add(vid, frames))
                bar.update(1)
                if unsaved and time.monotonic() - saved_at >= save_every:
                    started = time.monotonic()
                    save_torch(output, features)
                    # A huge file takes long to write: never spend more than ~10% of the time saving.
                    saved_at, unsaved = time.monotonic(), 0
                    save_every = max(SAVE_EVERY_S, 10 * (saved_at - started))
            finish(batcher.flush())
    finally:
        if unsaved:  # also on Ctrl-C or a crash: keep every video finished so far
            save_torch(output, features)
    return summary


# --------------------------------------------------------------------------- the command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``extract-features`` options to ``parser``."""
    parser.add_argument(
        "videos",
        nargs="+",
        help="video files, folders (searched recursively for video files), "
        ".txt lists (one path per line) or glob patterns",
    )
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help=f"features file to write or resume (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--clip_model",
        default=DEFAULT_MODEL,
        help=f"local folder of a Hugging Face CLIP model, or a hub id "
        f"(default {DEFAULT_MODEL}; downloading needs network)",
    )
    parser.add_argument(
        "--fps", type=float, default=1, help="frames per second to sample (default 1; TVQA used 3)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=64, help="frames per CLIP forward pass (default 64)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--video_id",
        choices=sorted(VIDEO_IDS),
        default="stem",
        help="video id in the output: stem = file name without extension (default), "
        "name = file name, path = the path as listed",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="videos decoded in parallel (default min(4, CPUs))"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``extract-features`` and print a summary line plus one line per failed video.

    Returns 0 when every requested video is in the output (extracted now or earlier) and 1 when any
    failed; the others are written either way. User errors raise :class:`FlipVQAError` for the CLI
    to report.
    """
    summary = extract_features(
        args.videos,
        args.clip_model,
        args.output,
        fps=args.fps,
        batch_size=args.batch_size,
        device=args.device,
        video_id=args.video_id,
        workers=getattr(args, "workers", None),
    )
    failed = summary["failed"]
    print(
        f"{summary['output']}: extracted {summary['extracted']} videos, "
        f"{summary['skipped_existing']} already there, {len(failed)} failed"
    )
    for vid, path, reason in failed:
        print(f"  failed {vid} ({path}): {reason}")
    # Any failure fails the command, so a script cannot mistake an incomplete output for a full
    # one; the videos that did work are saved all the same, and a rerun retries only the failures.
    return 1 if failed else 0
