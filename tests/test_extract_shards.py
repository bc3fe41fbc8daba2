"""``extract-features`` into a packed store and in parts: torchrun's processes (gloo, 2 CPU
processes), ``--shard I/N`` with a merge afterwards, and resuming after a kill, all giving the bits
of one uninterrupted one-process run. The tiny CLIP and the videos come from test_features.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("transformers")

from flipvqa.cli import main  # noqa: E402
from flipvqa.data.store import open_store  # noqa: E402
from flipvqa.errors import FlipVQAError  # noqa: E402
from flipvqa.features import clip, extract  # noqa: E402
from flipvqa.features.extract import extract_features  # noqa: E402

from conftest import TORCHRUN_PORT  # noqa: E402
from test_features import make_video, tiny_clip  # noqa: E402,F401  (the fixture is reused)

LENGTHS = [30, 55, 80, 40, 62]  # 25 fps: 1 to 3 frames at fps 1


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i, n in enumerate(LENGTHS):
        make_video(folder / f"v{i}.mp4", n, size=(64 + 16 * (i % 2), 48))
    return folder


def one_process(videos: Path, clip_model: Path, output: Path, threads: int = 2, **kw) -> dict:
    """An uninterrupted one-process run (torchrun gives each process one thread: so can this)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return extract_features([videos], clip_model, output, device="cpu", workers=1, **kw)
    finally:
        torch.set_num_threads(before)


def test_packed_output_holds_the_bits_of_the_pth_output(tmp_path: Path, videos: Path, tiny_clip: Path) -> None:
    one_process(videos, tiny_clip, tmp_path / "f.pth", batch_size=4)
    summary = one_process(videos, tiny_clip, tmp_path / "f.safetensors", batch_size=4, chunk_videos=2)
    assert summary["extracted"] == 5 and not summary["failed"]
    pth, packed = torch.load(tmp_path / "f.pth", weights_only=True), open_store(tmp_path / "f.safetensors")
    assert list(packed) == sorted(pth) and all(torch.equal(packed[k], v) for k, v in pth.items())
    assert packed.encoder == {"encoder": str(tiny_clip.resolve()), "model_type": "clip_vision_model",
                              "feature_dim": 768, "fps": 1.0}
    assert not (tmp_path / "f.safetensors.parts").exists()  # merged, then removed


def test_resumed_run_gives_the_bits_of_one_run(tmp_path: Path, videos: Path, tiny_clip: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted when the 4th video is decoded (v0 and v1 are in chunks, v2's frames were still
    waiting for a full batch), resumed: v2 to v4 fall in other batches, at other places, than in one
    run, and still give the same bits (the last batch is padded to full size)."""
    one_process(videos, tiny_clip, tmp_path / "ref.safetensors", batch_size=4)
    real, decoded, stop = extract.iter_frames, [], ["v3"]

    def stop_at_v3(path: Path, fps: float, crop: bool = True) -> Iterator[np.ndarray]:
        if Path(path).stem in stop:
            raise KeyboardInterrupt
        decoded.append(Path(path).stem)
        return real(path, fps, crop)

    monkeypatch.setattr(extract, "iter_frames", stop_at_v3)
    with pytest.raises(KeyboardInterrupt):
        one_process(videos, tiny_clip, tmp_path / "out.safetensors", batch_size=4, chunk_videos=1)
    assert not (tmp_path / "out.safetensors").exists()
    assert len(list((tmp_path / "out.safetensors.parts").glob("part-0000-of-0001-*.safetensors"))) >= 1
    stop.clear()
    summary = one_process(videos, tiny_clip, tmp_path / "out.safetensors", batch_size=4, chunk_videos=1)
    assert summary["skipped_existing"] == 2 and summary["extracted"] == 3 and decoded[-3:] == ["v2", "v3", "v4"]
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_shards_then_merge(tmp_path: Path, videos: Path, tiny_clip: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The SLURM array way: --shard i/n tasks, then the same command without --shard merges (or
    data pack --merge); a task with another --fps is refused."""
    one_process(videos, tiny_clip, tmp_path / "ref.safetensors")
    out = tmp_path / "out.safetensors"
    flags = [str(videos), "--clip_model", str(tiny_clip), "--device", "cpu", "--output", str(out)]
    assert main(["-q", "extract-features", *flags, "--shard", "1/2"]) == 0
    assert "part 1/2 is in" in capsys.readouterr().out and not out.exists()
    assert main(["-q", "extract-features", *flags, "--shard", "0/2", "--fps", "2"]) == 2
    assert f"made with fps 1.0 (says {out}.parts/part-0001-of-0002-000000.safetensors)" in capsys.readouterr().err
    assert main(["-q", "extract-features", *flags, "--shard", "0/2"]) == 0
    assert main(["-q", "data", "pack", "--merge", f"{out}.parts", "--output", str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    monkeypatch.setattr(clip, "load_encoder", lambda *a: pytest.fail("model loaded with nothing to do"))
    assert main(["-q", "extract-features", *flags]) == 0
    assert "extracted 0 videos, 5 already there, 0 failed" in capsys.readouterr().out
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not Path(f"{out}.parts").exists()
    with pytest.raises(FlipVQAError, match="--shard 2/2: expected I/N"):
        extract_features([videos], tiny_clip, out, shard="2/2")


def test_shards_into_a_pth(tmp_path: Path, videos: Path, tiny_clip: Path) -> None:
    """--shard tasks can also end in a .pth: the run without --shard merges the parts into it (and
    its sidecar), sorted by video id."""
    one_process(videos, tiny_clip, tmp_path / "ref.pth")
    for shard in ("0/2", "1/2"):
        one_process(videos, tiny_clip, tmp_path / "out.pth", shard=shard)
    assert not (tmp_path / "out.pth").exists()
    assert one_process(videos, tiny_clip, tmp_path / "out.pth")["skipped_existing"] == 5
    ref, out = (torch.load(tmp_path / f"{n}.pth", weights_only=True) for n in ("ref", "out"))
    assert list(out) == sorted(ref) and all(torch.equal(out[k], v) for k, v in ref.items())
    assert (tmp_path / "out.pth.json").read_text() == (tmp_path / "ref.pth.json").read_text()


def torchrun(output: Path, videos: Path, clip_model: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLIPVQA_CRASH_AT"}
    if crash:
        env["FLIPVQA_CRASH_AT"] = crash
    command = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN_PORT(), "--nproc_per_node", "2",
               "-m", "flipvqa", "-q", "extract-features", str(videos), "--clip_model", str(clip_model),
               "--device", "cpu", "--output", str(output), "--batch_size", "1", "--chunk_videos", "1",
               "--workers", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_killed_then_resumed_equals_one_process(tmp_path: Path, videos: Path, tiny_clip: Path) -> None:
    """Two processes, each killed (SIGKILL) in its second chunk write: the first chunks survive;
    rerun, they are not extracted again, and rank 0 merges the bits of a one-process run."""
    one_process(videos, tiny_clip, tmp_path / "ref.safetensors", threads=1, batch_size=1)
    out = tmp_path / "out.safetensors"
    killed = torchrun(out, videos, tiny_clip, crash="write:2")
    assert killed.returncode != 0 and not out.exists()
    chunks = list(Path(f"{out}.parts").glob("part-*-of-0002-*.safetensors"))
    assert chunks and list(Path(f"{out}.parts").glob(".*.tmp"))  # whole chunks, and a half one, hidden
    done = torchrun(out, videos, tiny_clip)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("extracted") == 1  # rank 0 alone prints, the totals of both
    assert f"extracted {5 - len(chunks)} videos, {len(chunks)} already there, 0 failed" in done.stdout
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not Path(f"{out}.parts").exists()
