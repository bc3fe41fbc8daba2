"""``extract-features`` in parts: a packed output, torchrun's processes, SLURM array tasks.

Part ``i`` of ``n`` takes the videos ``sorted(ids)[i::n]`` (under torchrun ``i`` is the rank and ``n``
the world size; with ``--shard i/n`` they are given). It writes what it extracts into
``<output>.parts/`` as small packed stores, "chunks" (``part-<i>-of-<n>-<k>.safetensors``), each
written atomically after ``--chunk_videos`` videos or a minute: a killed process loses at most one
chunk, and rerunning the command skips every video already in a chunk or in the output (also with
another number of processes, since a part only skips what is done).

Then the chunks and the existing output are merged into ``output``, sorted by video id, so the
result does not depend on how many processes made it nor on interruptions, and the parts folder is
removed. Under torchrun rank 0 merges once every rank is done; they wait on a gloo group of their
own with a week's timeout, as ranks finish far apart and NCCL's default timeout is ten minutes.
With ``--shard`` (n > 1) nothing waits: the same command without ``--shard``, run after the tasks,
extracts what they left and merges (or ``flipvqa data pack --merge <output>.parts --output <output>``).
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from flipvqa.data import pack, store
from flipvqa.data.sidecar import check_record
from flipvqa.devices import init_distributed, resolve_device
from flipvqa.errors import FlipVQAError
from flipvqa.features import clip

CHUNK_VIDEOS = 500  # videos per chunk: small enough to lose little, large enough to keep files few
CHUNK = re.compile(r"part-(\d+)-of-(\d+)-(\d+)\.safetensors")
WAIT = timedelta(days=7)  # how long a finished rank waits for the others


def sharded(output: Path, shard: Optional[str]) -> bool:
    """Whether this run goes through parts: a packed output, ``--shard``, torchrun, or parts left to
    merge (``--shard`` tasks into a ``.pth``)."""
    return store.is_packed(output) or shard is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        or parts_dir(output).is_dir()


def parse_shard(text: Optional[str | tuple[int, int]]) -> Optional[tuple[int, int]]:
    """``"3/8"`` (or (3, 8)) -> (3, 8); None stays None."""
    if text is None:
        return None
    if isinstance(text, tuple):
        text = "/".join(map(str, text))
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not found or not int(found[1]) < int(found[2]):
        raise FlipVQAError(f"--shard {text}: expected I/N with 0 <= I < N (e.g. 3/8, the 4th of 8 parts)")
    return int(found[1]), int(found[2])


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def extract(ids: dict[str, Path], clip_model: Any, output: Path, shard: Optional[tuple[int, int]], *, fps: float,
            batch_size: int, device: Any, workers: Optional[int], chunk_videos: int) -> dict[str, Any]:
    """Extract this process's part of ``ids`` into chunks, then (all parts done) merge into ``output``.
    Returns extract_features' summary, summed over torchrun's processes."""
    part, count, group, target = _join(device, shard)
    folder = parts_dir(output)
    existing, chunks = _done(output, folder)
    _check_records(output, existing, chunks, {"encoder": clip.encoder_name(clip_model), "fps": fps})
    done = set(existing[1]).union(*(videos for _, videos, _ in chunks))
    mine = [(vid, ids[vid]) for vid in sorted(ids)[part::count]]
    todo = [(vid, path) for vid, path in mine if vid not in done]
    summary: dict[str, Any] = {"extracted": 0, "skipped_existing": len(mine) - len(todo), "failed": [],
                               "output": output}
    if todo:
        encoder = clip.as_encoder(clip_model, target)
        record = {**encoder.record(), "fps": fps}
        _check_records(output, existing, chunks, record)
        _extract_chunks(todo, encoder, target, record, folder, (part, count), summary,
                        fps=fps, batch_size=batch_size, workers=workers, chunk_videos=chunk_videos)
    summary = _gather(summary, group)  # also the barrier: every part is written after this
    if shard is not None and count > 1:
        summary["next"] = (f"part {part}/{count} is in {folder}; once all {count} parts are done, run this "
                           f"command again without --shard to merge them into {output}")
        return summary
    error = None
    if part == 0 and folder.is_dir():
        try:  # every rank is past the barrier: the chunks are all written, so list them again
            existing, chunks = _done(output, folder)
            pack.merge([existing, *chunks], output)
            shutil.rmtree(folder)
        except FlipVQAError as exc:
            error = str(exc)
    summary["error"] = _release(group, error)
    if summary["error"] and part == 0:
        raise FlipVQAError(summary["error"])
    return summary


def _join(device: Any, shard: Optional[tuple[int, int]]) -> tuple[int, int, Any, torch.device]:
    """(this part, the part count, the gloo group to wait on or None, the device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return *(shard or (0, 1)), None, resolve_device(device)
    if shard is not None:
        raise FlipVQAError("--shard under torchrun: torchrun's processes split the videos already; use one or "
                           "the other")
    dist, target = init_distributed(None if device is None else str(device))
    return dist.rank, dist.world_size, torch_dist.new_group(backend="gloo", timeout=WAIT), target


def _done(output: Path, folder: Path) -> tuple[pack.Source, list[pack.Source]]:
    """(the existing output, the chunks in ``folder``) as merge sources; absent output: no videos."""
    existing: pack.Source = (str(output), {}, {})
    if output.is_file():
        try:  # an open packed output stays valid when the merge replaces the file
            existing = pack.open_source(output)
        except FlipVQAError as exc:
            raise FlipVQAError(f"{exc}; move it away") from None
    chunks = []
    for path in (sorted(folder.glob("*" + store.SUFFIX)) if folder.is_dir() else []):
        try:
            chunks.append(pack.open_source(path))
        except FlipVQAError as exc:  # an atomic write cannot leave this; a damaged disk can
            raise FlipVQAError(f"{exc} (delete it and rerun: its videos are extracted again)") from None
    return existing, chunks


def _check_records(output: Path, existing: pack.Source, chunks: list[pack.Source], run: dict[str, Any]) -> None:
    """Refuse to add to an output or to chunks made by another encoder or fps."""
    if existing[1]:  # a packed output has its record inside, a .pth in its sidecar
        check_record(output, existing[2] or None, run, f"{output.name}'s metadata" if store.is_packed(output) else None)
    for name, _, recorded in chunks:
        check_record(output, recorded or None, run, name)


def _extract_chunks(todo: list[tuple[str, Path]], encoder: clip.Encoder, target: torch.device,
                    record: dict[str, Any], folder: Path, part: tuple[int, int], summary: dict[str, Any],
                    **loop: Any) -> None:
    """Embed ``todo``, writing each ``chunk_videos`` finished videos (or a minute's) as a new chunk."""
    from flipvqa.features.extract import embed_videos  # extract imports this module

    numbers = [int(m[3]) for p in (folder.iterdir() if folder.is_dir() else [])
               if (m := CHUNK.fullmatch(p.name)) and (int(m[1]), int(m[2])) == part]
    state = {"next": max(numbers, default=-1) + 1}
    pending: dict[str, torch.Tensor] = {}

    def save() -> None:
        name = f"part-{part[0]:04d}-of-{part[1]:04d}-{state['next']:06d}{store.SUFFIX}"
        store.write_store(folder / name, pending, sorted(pending), encoder=record, desc="chunk")
        pending.clear()
        state["next"] += 1

    embed_videos(todo, encoder, target, loop["fps"], loop["batch_size"], loop["workers"], summary,
                 pending.update, save, save_after=loop["chunk_videos"])


def _gather(summary: dict[str, Any], group: Any) -> dict[str, Any]:
    """Every rank's summary added up (waiting for all ranks); this one alone without torchrun."""
    if group is None:
        return summary
    every: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(every, summary, group=group)
    return {"extracted": sum(s["extracted"] for s in every), "failed": [f for s in every for f in s["failed"]],
            "skipped_existing": sum(s["skipped_existing"] for s in every), "output": summary["output"]}


def _release(group: Any, error: Optional[str]) -> Optional[str]:
    """Rank 0's merge error (None when it merged) on every rank; the others wait for it here."""
    if group is None:
        return error
    box = [error]
    torch_dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
