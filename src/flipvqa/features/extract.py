"""``flipvqa extract-features``: videos -> CLIP ViT-L/14 frame features, as FrozenBiLM released them.

The output is ``torch.save({video_id: float16 tensor [frames, 768]})``: one CLIP image embedding
(class token after the post layer norm, times the visual projection, *not* L2-normalised) per frame
selected by :mod:`flipvqa.features.video`.

Behaviour worth knowing:

* Frames from several videos share one CLIP batch, and videos are decoded by a few threads ahead of
  the model, so short videos do not leave the accelerator idle.
* Resume: an existing output file is loaded and the videos already in it are skipped. The file is
  rewritten atomically (temporary file + ``os.replace``) about once a minute, at the end, and when
  the run is interrupted, so a crash loses at most a minute of work and never the file.
* A video that cannot be decoded, or that yields no frame (shorter than half a slot), is skipped and
  listed at the end; :func:`run` returns 0 when the output holds at least one requested video
  (extracted now or earlier) and 1 when every video failed.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from flipvqa.errors import FlipVQAError
from flipvqa.features.video import SIZE, import_av, preprocess, sample_frames

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_OUTPUT = "clipvitl14.pth"
VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .flv .wmv .3gp .ts .mts .ogv".split())
VIDEO_IDS: dict[str, Callable[[Path], str]] = {
    "stem": lambda path: path.stem,  # file name without extension (all the benchmarks' ids)
    "name": lambda path: path.name,  # file name with extension
    "path": lambda path: str(path),  # the path as listed: always unique
}
SAVE_EVERY_S = 60.0


# --------------------------------------------------------------------------- finding the videos


def collect_videos(specs: Sequence[str | Path]) -> list[Path]:
    """Expand folders (recursively, by video extension), ``.txt`` lists, globs and files into paths.

    A ``.txt`` list holds one path per line (blank lines and ``#`` comments ignored); relative
    entries are looked up from the current folder, then from the list's folder. Anything named
    explicitly that does not exist is an error, so a typo fails before hours of extraction.
    Duplicates (the same file reached twice) are dropped; order is kept.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            videos = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
            )
            if not videos:
                raise FlipVQAError(
                    f"{path}: folder contains no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})"
                )
            found += videos
        elif path.suffix.lower() == ".txt" and path.is_file():
            found += _read_list(path)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(str(spec)):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(spec)), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise FlipVQAError(f"{spec}: pattern matches no file")
            found += matches
        else:
            raise FlipVQAError(f"{spec}: no such file or folder")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise FlipVQAError("no video given")
    return list(unique.values())


def _read_list(list_file: Path) -> list[Path]:
    """Read a ``.txt`` list of video paths (see :func:`collect_videos`)."""
    paths = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute() and not path.exists():
            path = list_file.parent / path
        if not path.is_file():
            raise FlipVQAError(f"{list_file}:{number}: no such video file: {entry}")
        paths.append(path)
    return paths


def assign_ids(paths: Sequence[Path], rule: str = "stem") -> dict[str, Path]:
    """Map each video id (derived by ``rule``, one of :data:`VIDEO_IDS`) to its path.

    Two files with the same id would silently overwrite each other in the output, so that is an
    error naming both.
    """
    if rule not in VIDEO_IDS:
        raise FlipVQAError(f"unknown --video_id rule {rule!r}; choose one of {', '.join(VIDEO_IDS)}")
    ids: dict[str, Path] = {}
    for path in paths:
        video_id = VIDEO_IDS[rule](path)
        if video_id in ids:
            raise FlipVQAError(
                f"{ids[video_id]} and {path} both get video id {video_id!r}; "
                "remove one or choose another --video_id rule"
            )
        ids[video_id] = path
    return ids


# --------------------------------------------------------------------------- the model


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``, defaulting to CUDA when available; an unusable device is a user error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise FlipVQAError(f"--device {device!r}: not a torch device ({err})") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FlipVQAError(f"--device {device}: CUDA is not available on this machine")
    return resolved


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar: a full CLIP checkpoint carries a text
    tower that is expectedly unused. Missing vision weights are checked in :func:`load_clip`."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(source: str, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
    """Load the vision tower + projection from a full ``CLIPModel`` or a vision-only checkpoint."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(source, **kwargs)
        if isinstance(config, CLIPConfig):
            # A full CLIP config keeps the projection size at the top level; the nested vision
            # config may carry a stale default (512), which would re-initialise the projection.
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
        elif isinstance(config, CLIPVisionConfig):
            vision = config
        else:
            raise FlipVQAError(f"--clip_model {source}: a {config.model_type!r} model, not CLIP")
        return CLIPVisionModelWithProjection.from_pretrained(
            source, config=vision, output_loading_info=True, **kwargs
        )


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else was meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_clip(name_or_path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load the vision tower + projection of a Hugging Face CLIP model, in eval mode on ``device``.

    ``name_or_path`` is a local folder (of a full ``CLIPModel`` or a ``CLIPVisionModelWithProjection``)
    or a hub id. A hub id is taken from the local cache when present; otherwise it is downloaded,
    after a quick reachability check so an offline machine fails at once instead of hanging.
    """
    try:
        import transformers  # noqa: F401 - only to report a missing optional dependency clearly
    except ImportError as err:
        raise FlipVQAError(f"--clip_model {name_or_path}: needs `pip install transformers` ({err})") from err
    target = resolve_device(device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise FlipVQAError(f"{path}: is a file; pass the folder of a Hugging Face CLIP model")
    if path.is_dir():
        try:
            model, info = _from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise FlipVQAError(
                f"{path}: cannot load a CLIP model from this folder ({_first_line(err)})"
            ) from err
    elif _looks_like_path(name):
        raise FlipVQAError(f"{path}: no such CLIP model folder")
    else:
        try:  # the hub cache first: works offline once downloaded
            model, info = _from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            model, info = _download(name)
    if info.get("missing_keys"):
        missing = ", ".join(sorted(info["missing_keys"])[:3])
        raise FlipVQAError(
            f"--clip_model {name}: not a CLIP vision model with projection (missing {missing}, ...)"
        )
    if model.config.image_size != SIZE:
        raise FlipVQAError(
            f"--clip_model {name}: expects {model.config.image_size}px images, frames are {SIZE}px"
        )
    if model.config.projection_dim != 768:
        log.warning(
            "%s: embeddings have %d dimensions, not ViT-L/14's 768", name, model.config.projection_dim
        )
    # float32 weights whatever the checkpoint stores: CPU needs them; CUDA runs under fp16 autocast.
    return model.float().eval().to(target)


def _download(name: str) -> tuple[torch.nn.Module, dict]:
    """Fetch hub model ``name`` (not in the cache), failing fast with advice when offline."""
    advice = "download it elsewhere and pass its local folder with --clip_model"
    offline_vars = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in offline_vars):
        raise FlipVQAError(f"--clip_model {name}: not in the local cache and the hub is offline; {advice}")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, timeout=10)  # cheap probe: a dead network fails here in seconds
    except Exception as err:  # DNS, HTTP or a missing repo: the same advice in every case
        raise FlipVQAError(
            f"--clip_model {name}: cannot reach it on the Hugging Face hub ({_first_line(err)}); {advice}"
        ) from err
    try:
        return _from_pretrained(name)
    except (OSError, ValueError, RuntimeError) as err:
        raise FlipVQAError(f"--clip_model {name}: download failed ({_first_line(err)}); {advice}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def embed(model: torch.nn.Module, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """CLIP image embeddings of uint8 frames ``[n, 224, 224, 3]`` as a float16 CPU tensor ``[n, dim]``."""
    pixels = preprocess(torch.from_numpy(frames).to(device, non_blocking=True))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        embeds = model(pixel_values=pixels).image_embeds
    return embeds.to("cpu", torch.float16)


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
    try:
        features = torch.load(output, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and IO errors all mean "not a features file" here
        raise FlipVQAError(
            f"{output}: cannot read the existing output to resume ({_first_line(err)}); move it away"
        ) from err
    if not isinstance(features, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in features.items()
    ):
        raise FlipVQAError(f"{output}: existing output is not a {{video_id: tensor}} dict; move it away")
    return features


def save_atomic(features: dict[str, torch.Tensor], output: Path) -> None:
    """Write ``features`` to ``output`` via a temporary file in the same folder and ``os.replace``,
    so a crash mid-write leaves the previous file intact."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's private 0600 would otherwise stick to the output
        with os.fdopen(handle, "wb") as file:
            torch.save(features, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, output)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _decode(path: Path, fps: float) -> np.ndarray | str:
    """Sample a video's frames; an unreadable video gives the reason as a string instead."""
    av = import_av()
    try:
        frames = sample_frames(path, fps)
    except (FlipVQAError, av.FFmpegError, OSError, ValueError) as err:
        return _first_line(err).removeprefix(f"{path}: ")  # the summary names the path already
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
        with logging_redirect_tqdm(), tqdm(total=len(todo), unit="video", desc="extract-features") as bar:
            for vid, path, frames in _decoded_ahead(todo, fps, workers):
                if isinstance(frames, str):
                    log.warning("%s: skipped, %s", path, frames)
                    summary["failed"].append((vid, path, frames))
                else:
                    finish(batcher.add(vid, frames))
                bar.update(1)
                if unsaved and time.monotonic() - saved_at >= save_every:
                    started = time.monotonic()
                    save_atomic(features, output)
                    # A huge file takes long to write: never spend more than ~10% of the time saving.
                    saved_at, unsaved = time.monotonic(), 0
                    save_every = max(SAVE_EVERY_S, 10 * (saved_at - started))
            finish(batcher.flush())
    finally:
        if unsaved:  # also on Ctrl-C or a crash: keep every video finished so far
            save_atomic(features, output)
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

    Returns 0 when the output holds at least one of the requested videos (or none failed), 1 when
    every video failed. User errors raise :class:`FlipVQAError` for the CLI to report.
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
    # Success when the output holds any requested video: a resumed run whose remaining videos are
    # all broken still succeeded at what can be done; the failures are listed above either way.
    return 0 if summary["extracted"] or summary["skipped_existing"] or not failed else 1
