"""``flipvqa extract-features``: videos -> frame features, by default CLIP ViT-L/14's as FrozenBiLM
released them, or those of another CLIP-family vision tower (SigLIP, SigLIP 2).

The output is ``torch.save({video_id: float16 tensor [frames, D]})``: one image embedding
(:class:`flipvqa.features.clip.Encoder`) per frame selected by :mod:`flipvqa.features.video`, for
the videos :mod:`flipvqa.features.collect` finds. This module is the extraction loop and the command.
Beside it, ``<output>.json`` records the encoder: ``{"encoder", "model_type", "feature_dim", "fps"}``
(the dataset readers take the ``.pth`` alone, so nothing but tensors goes in it).

Behaviour worth knowing:

* Frames from several videos share one batch, and videos are decoded (and, for encoders with an
  image processor, preprocessed) by a few threads ahead of the model, so short videos do not leave
  the accelerator idle.
* Resume: an existing output file is loaded and the videos already in it are skipped. The file is
  rewritten atomically (temporary file + ``os.replace``) about once a minute, at the end, and when
  the run is interrupted, so a crash loses at most a minute of work and never the file. A run whose
  encoder, width or fps differ from the sidecar's is refused rather than mixing features.
* A video that cannot be decoded, or that yields no frame (shorter than half a slot), is skipped and
  listed at the end, after the others are written; :func:`run` then returns 1, so a script sees
  that the output is incomplete. It returns 0 only when no requested video failed.
* An output ending in ``.safetensors`` is written as a packed feature store
  (:mod:`flipvqa.data.store`, the encoder in its metadata), and under torchrun or ``--shard I/N``
  the videos are split over processes; both go through :mod:`flipvqa.features.shards`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from flipvqa.data.sidecar import check_record, read_record, record_path, write_record  # noqa: F401 (re-exported)
from flipvqa.devices import resolve_device
from flipvqa.errors import FlipVQAError
from flipvqa.features import clip, shards
from flipvqa.features.clip import (
    DEFAULT_MODEL,
    Encoder,
    Pixels,
    cat_pixels,
    count_pixels,
    encoder_name,
    slice_pixels,
)
from flipvqa.features.collect import VIDEO_IDS, assign_ids, collect_videos
from flipvqa.features.video import import_av, iter_frames
from flipvqa.io import first_line, load_tensors, progress, save_torch

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "clipvitl14.pth"
SAVE_EVERY_S = 60.0
PREPARE_CHUNK = 32  # frames decoded before the encoder prepares them: bounds full-size frames held


# --------------------------------------------------------------------------- batching and the output


class _Batcher:
    """Packs prepared frames of consecutive videos into full batches and hands back finished videos."""

    def __init__(self, encoder: Encoder, device: torch.device, batch_size: int) -> None:
        self.encoder, self.device, self.batch_size = encoder, device, batch_size
        self.queue: deque[tuple[str, Pixels]] = deque()  # (video id, frames not yet embedded)
        self.buffered = 0
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.waiting: dict[str, int] = {}  # frames of each video still to embed

    def add(self, video_id: str, frames: Pixels) -> dict[str, torch.Tensor]:
        """Queue a video's frames; return the videos completed by the full batches this allows."""
        self.queue.append((video_id, frames))
        self.parts[video_id], self.waiting[video_id] = [], count_pixels(frames)
        self.buffered += count_pixels(frames)
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
            take = min(size, count_pixels(frames))
            chunks.append(slice_pixels(frames, 0, take))
            owners.append((video_id, take))
            if take == count_pixels(frames):
                self.queue.popleft()
            else:
                self.queue[0] = (video_id, slice_pixels(frames, take))
            size -= take
        batch = cat_pixels(chunks)
        count = count_pixels(batch)
        self.buffered -= count
        # The last batch is padded to full size (with copies of its last frame): matmul kernels are
        # chosen by shape, so a frame's embedding then never depends on the batch it fell in, and
        # a resumed or multi-process run gives the bits a single run gives.
        padding = [slice_pixels(batch, count - 1)] * (self.batch_size - count)
        embeds = self.encoder.embed(cat_pixels([batch, *padding]), self.device)[:count]
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


def _chunks(frames: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    items = iter(frames)
    while chunk := list(islice(items, size)):
        yield np.stack(chunk)


def _decode(path: Path, fps: float, encoder: Encoder) -> Pixels | str:
    """Sample a video's frames in the encoder's geometry and prepare them, a chunk at a time (so
    full-size frames are never all held); an unreadable video gives the reason as a string instead."""
    av = import_av()
    try:
        frames = iter_frames(path, fps, crop=encoder.crop)
        parts = [encoder.prepare(chunk) for chunk in _chunks(frames, PREPARE_CHUNK)]
    except (FlipVQAError, av.FFmpegError, OSError, ValueError) as err:
        return first_line(err).removeprefix(f"{path}: ")  # the summary names the path already
    return cat_pixels(parts) if parts else "no frames (shorter than one output frame?)"


def _decoded_ahead(
    todo: Sequence[tuple[str, Path]], fps: float, workers: int, encoder: Encoder
) -> Iterator[tuple[str, Path, Pixels | str]]:
    """Yield ``(id, path, frames or failure)`` in order, decoding a few videos ahead in threads
    (PyAV and PIL release the GIL), with a bounded look-ahead to bound memory."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque[tuple[str, Path, Future]] = deque()
    try:
        for video_id, path in todo:
            pending.append((video_id, path, pool.submit(_decode, path, fps, encoder)))
            if len(pending) > 2 * workers:
                video_id, path, future = pending.popleft()
                yield video_id, path, future.result()
        while pending:
            video_id, path, future = pending.popleft()
            yield video_id, path, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the encoder's record


def _check_width(output: Path, features: dict[str, torch.Tensor], encoder: Encoder) -> None:
    """An output from before sidecars: at least its width must be the encoder's."""
    widths = sorted({int(v.shape[-1]) if v.dim() else 0 for v in features.values()})
    if widths != [encoder.feature_dim]:
        raise FlipVQAError(
            f"{output}: its features are {'/'.join(map(str, widths))}-d, {encoder.source} gives "
            f"{encoder.feature_dim}-d; choose another --output rather than mixing features"
        )
    log.warning("%s: no %s names the encoder of its %d videos; taking it to be %s",
                output, record_path(output).name, len(features), encoder.source)


def extract_features(
    paths: str | Path | Sequence[str | Path],
    clip_model: str | Path | torch.nn.Module | Encoder,
    output: str | Path,
    fps: float = 1,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    video_id: str = "stem",
    workers: int | None = None,
    shard: str | None = None,
    chunk_videos: int = shards.CHUNK_VIDEOS,
) -> dict[str, Any]:
    """Extract frame features for ``paths`` (files, folders, ``.txt`` lists, globs) into ``output``.

    ``clip_model`` is a folder or hub id of a CLIP-family vision tower, an :class:`Encoder` from
    :func:`~flipvqa.features.clip.load_encoder`, or a CLIP model from ``load_clip``. ``output`` gets
    the sidecar ``<output>.json`` (:func:`record_path`) before its first save. An ``output`` ending
    in ``.safetensors`` is a packed store; it, torchrun and ``shard`` ("I/N") extract in parts
    (:mod:`flipvqa.features.shards`, ``chunk_videos`` videos a chunk).
    Returns ``{"extracted": int, "skipped_existing": int, "failed": [(video_id, path, reason)],
    "output": Path}``.
    """
    if fps <= 0:
        raise FlipVQAError(f"--fps must be positive, got {fps}")
    if batch_size < 1:
        raise FlipVQAError(f"--batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise FlipVQAError(f"--workers must be at least 1, got {workers}")
    if chunk_videos < 1:
        raise FlipVQAError(f"--chunk_videos must be at least 1, got {chunk_videos}")
    import_av()  # fail once, up front, rather than once per video
    output = Path(output).expanduser()
    ids = assign_ids(collect_videos([paths] if isinstance(paths, (str, Path)) else paths), video_id)
    if shards.sharded(output, shard):
        return shards.extract(ids, clip_model, output, shards.parse_shard(shard), fps=float(fps),
                              batch_size=batch_size, device=device, workers=workers, chunk_videos=chunk_videos)
    features = load_existing(output)
    recorded = read_record(output) if features else None  # a sidecar without an output is stale
    # Checked before loading anything: a mismatch needs no model, even with nothing left to do.
    check_record(output, recorded, {"encoder": encoder_name(clip_model), "fps": float(fps)})
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
    encoder = clip.as_encoder(clip_model, target)
    run_record = {**encoder.record(), "fps": float(fps)}
    check_record(output, recorded, run_record)
    if recorded is None and features:
        _check_width(output, features, encoder)
    recorded_now = run_record == recorded

    def save() -> None:
        nonlocal recorded_now
        if not recorded_now:  # the sidecar first: features never stand without their record
            write_record(output, run_record)
            recorded_now = True
        save_torch(output, features)

    embed_videos(todo, encoder, target, fps, batch_size, workers, summary, features.update, save)
    return summary


def embed_videos(todo: Sequence[tuple[str, Path]], encoder: Encoder, device: torch.device, fps: float,
                 batch_size: int, workers: int | None, summary: dict[str, Any],
                 keep: Callable[[dict[str, torch.Tensor]], Any], save: Callable[[], None],
                 save_after: int | None = None) -> None:
    """Embed the videos of ``todo``, handing each group of finished ones to ``keep``; ``save()``
    makes what was kept durable: every SAVE_EVERY_S seconds (at most ~10% of the time), after
    ``save_after`` unsaved videos, at the end and when interrupted. Counts and failures go to ``summary``."""
    batcher = _Batcher(encoder, device, batch_size)
    workers = workers or min(4, os.cpu_count() or 1)
    saved_at, save_every = time.monotonic(), SAVE_EVERY_S
    unsaved = 0

    def finish(done: dict[str, torch.Tensor]) -> None:
        nonlocal unsaved
        keep(done)
        summary["extracted"] += len(done)
        unsaved += len(done)

    try:
        # logging_redirect_tqdm: warnings about skipped videos print above the bar, not through it.
        # progress(): hidden by -q; leave=True keeps the finished bar above the summary, as before.
        with logging_redirect_tqdm(), progress(
            total=len(todo), unit="video", desc="extract-features", leave=True
        ) as bar:
            for vid, path, frames in _decoded_ahead(todo, fps, workers, encoder):
                if isinstance(frames, str):
                    log.warning("%s: skipped, %s", path, frames)
                    summary["failed"].append((vid, path, frames))
                else:
                    finish(batcher.add(vid, frames))
                bar.update(1)
                due = time.monotonic() - saved_at >= save_every or (save_after is not None and unsaved >= save_after)
                if unsaved and due:
                    started = time.monotonic()
                    save()
                    # A huge file takes long to write: never spend more than ~10% of the time saving.
                    saved_at, unsaved = time.monotonic(), 0
                    save_every = max(SAVE_EVERY_S, 10 * (saved_at - started))
            finish(batcher.flush())
    finally:
        if unsaved:  # also on Ctrl-C or a crash: keep every video finished so far
            save()


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
        help=f"features file to write or resume (default {DEFAULT_OUTPUT}); a name ending in .safetensors "
        "writes the packed feature store",
    )
    parser.add_argument(
        "--clip_model",
        default=DEFAULT_MODEL,
        help="local folder or hub id of any CLIP-family vision tower: CLIP (as the released "
        "features), SigLIP or SigLIP 2 (their own image processor, pooled output); "
        f"default {DEFAULT_MODEL}; downloading needs network",
    )
    parser.add_argument(
        "--fps", type=float, default=1, help="frames per second to sample (default 1; TVQA used 3)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=64, help="frames per encoder forward pass (default 64)"
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
    parser.add_argument("--shard", default=None, metavar="I/N", help="extract part I of N (0-based; a SLURM "
                        "array task) into OUTPUT.parts/; the same command without --shard then merges the parts")
    parser.add_argument("--chunk_videos", type=int, default=shards.CHUNK_VIDEOS, help="in parts (torchrun, --shard, "
                        f".safetensors): videos per chunk, what a killed run can lose (default {shards.CHUNK_VIDEOS})")


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
        shard=getattr(args, "shard", None),
        chunk_videos=getattr(args, "chunk_videos", shards.CHUNK_VIDEOS),
    )
    failed = summary["failed"]
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 talks (and reports a failed merge)
        return 2 if summary.get("error") else 1 if failed else 0
    print(
        f"{summary['output']}: extracted {summary['extracted']} videos, "
        f"{summary['skipped_existing']} already there, {len(failed)} failed"
    )
    for vid, path, reason in failed:
        print(f"  failed {vid} ({path}): {reason}")
    if summary.get("next"):
        print(summary["next"])
    # Any failure fails the command, so a script cannot mistake an incomplete output for a full
    # one; the videos that did work are saved all the same, and a rerun retries only the failures.
    return 1 if failed else 0
