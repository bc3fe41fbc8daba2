"""What flipvqa costs before training starts, as the data grow: wall time and peak memory.

    python benchmarks/scale.py [--sizes 30000 300000 1000000] [--nproc 1] [--work /tmp/flipvqa-scale]
                               [--steps pack check train train eval] [--src SRC]

For each size (training questions; val is a tenth of it) a generic dataset is generated once under
``--work`` (kept for later runs): questions of 8 to 16 words with 5 options each over ``size / 5``
videos (at most 100,000), and a features file of 10 random 768-d float16 frames per video, as
``extract-features`` writes it. Then, on the bundled demo backbone (``--max_seq_len 256 --vaq
--qav --batch_size 8``), each step in ``--steps`` runs as its own process and prints one JSON line:

* ``pack``: ``flipvqa data pack`` of the features (skipped when the code has no such command);
* ``check``: ``flipvqa data check`` on the dataset;
* ``train``: ``flipvqa train`` until its first optimizer step (the first line of ``metrics.jsonl``),
  then killed; give it twice for a first and a second run on the same data; ``--nproc 2`` runs it
  under torchrun (peak memory is then per process, the largest);
* ``eval``: ``flipvqa eval --untrained`` on the val split, to the end.

``wall_s`` is from the process start; ``peak_rss_mb`` is the largest resident size of any of its
processes (``VmHWM``, sampled every 20 ms, and the exit's own figure for the main process).
``--src`` runs another checkout's code (its ``src`` folder goes first on PYTHONPATH): how the
figures before a change were taken.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "flipvqa" / "assets" / "demo"
WORDS = ("man woman boy girl dog cat ball car door table cup phone book chair window street tree bag hat "
         "red blue green small big old new first last after before while because then again slowly quickly "
         "open close pick put walk run jump sit stand look point hold throw catch push pull turn wave laugh").split()
FRAMES, WIDTH, OPTIONS = 10, 768, 5
GENERATED = ("train.jsonl", "val.jsonl", "features.pth", "generated.json")
MODEL = ["--llama_model_path", str(DEMO), "--model", "demo-llama", "--max_seq_len", "256"]


# ---------------------------------------------------------------------------- the dataset


def phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def generate(folder: Path, size: int, seed: int = 0) -> dict:
    """``folder/scale/{train,val}.jsonl`` and ``features.pth``, made once per size, in a process of
    its own: a child forked from a big parent would start with the parent's resident size, which
    Linux then reports as the child's peak (ru_maxrss)."""
    n_videos = min(max(size // 5, 1), 100_000)  # 300 K questions: 60 K videos, as in the issue
    meta = {"train": size, "val": size // 10, "videos": n_videos, "frames": FRAMES, "width": WIDTH, "seed": seed}
    stamp = folder / "scale" / "generated.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == meta):
        process = multiprocessing.get_context("spawn").Process(target=_write, args=(folder / "scale", meta))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"scale.py: generating {folder} failed")
    return meta


def _write(root: Path, meta: dict) -> None:
    import torch

    seed, n_videos = meta["seed"], meta["videos"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(seed)
    for split in ("train", "val"):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for k in range(meta[split]):
                row = {"video": f"v{rng.randrange(n_videos):06d}", "question": phrase(rng, 8, 16),
                       "options": [phrase(rng, 2, 6) for _ in range(OPTIONS)], "answer": rng.randrange(OPTIONS)}
                f.write(json.dumps(row) + "\n")
    gen = torch.Generator().manual_seed(seed)
    features = {f"v{k:06d}": torch.randn(FRAMES, WIDTH, generator=gen).half() for k in range(n_videos)}
    torch.save(features, root / "features.pth")
    (root / "generated.json").write_text(json.dumps(meta))


def forget(root: Path) -> None:
    """Remove what earlier runs left next to the data (a packed store, caches): each measurement
    sequence starts from the generated files alone."""
    for path in root.iterdir():
        if path.name not in GENERATED:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------------------- measuring


def hwm_mb(pid: int) -> float:
    """Peak resident size of a live process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*") if Path(f"/proc/{parent}/task").exists() else []:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def measure(cmd: list[str], env: dict, until: Path | None = None, timeout: float = 7200) -> dict:
    """Run ``cmd`` to its end, or (``until``) until that file has a line, then kill its process group."""
    start = time.perf_counter()
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the process
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    peak: dict[int, float] = {}
    reached = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not proc.poll(): it would take the rusage
        if pid:
            break
        for child in [proc.pid, *descendants(proc.pid)]:
            peak[child] = max(peak.get(child, 0.0), hwm_mb(child))
        if until is not None and until.is_file() and until.stat().st_size > 0 and reached is None:
            reached = time.perf_counter() - start
            os.killpg(proc.pid, signal.SIGKILL)
        elif time.perf_counter() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"scale.py: {' '.join(cmd[:4])} ran past {timeout} s")
        time.sleep(0.02)
    wall = reached if reached is not None else time.perf_counter() - start
    log.seek(0)
    err = log.read().decode(errors="replace")
    if reached is None and status != 0:
        raise SystemExit(f"scale.py: {' '.join(cmd)} failed:\n{err[-3000:]}")
    peak[proc.pid] = max(peak.get(proc.pid, 0.0), usage.ru_maxrss / 1024)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(max(peak.values()), 1), "processes": len(peak)}


def flipvqa(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "flipvqa"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "flipvqa"]


def step_command(step: str, data: Path, out: Path, nproc: int) -> tuple[list[str], Path | None]:
    dataset = ["--dataset", "scale", "--data_path", str(data)]
    if step == "pack":
        return [*flipvqa(1), "data", "pack", str(data / "scale" / "features.pth")], None
    if step == "check":
        return [*flipvqa(1), "-q", "data", "check", *dataset, *MODEL, "--vaq", "--qav"], None
    if step == "train":
        return [*flipvqa(nproc), "-q", "train", *dataset, *MODEL, "--vaq", "--qav", "--batch_size", "8", "--epochs",
                "1", "--num_workers", "0", "--output_dir", str(out)], out / "metrics.jsonl"
    if step == "eval":
        return [*flipvqa(nproc), "-q", "eval", *dataset, *MODEL, "--untrained", "--batch_size", "32",
                "--num_workers", "0", "--output_dir", str(out)], None
    raise SystemExit(f"scale.py: unknown step {step!r} (pack, check, train, eval)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30_000, 300_000, 1_000_000])
    parser.add_argument("--steps", nargs="+", default=["pack", "check", "train", "train", "eval"])
    parser.add_argument("--nproc", type=int, default=1, help="processes for train and eval (torchrun)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flipvqa-scale"))
    parser.add_argument("--src", type=Path, help="run this checkout's src/ instead (figures before a change)")
    parser.add_argument("--label", default="", help="a name for this code in the JSON lines (e.g. before)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src.resolve()), env.get("PYTHONPATH", "")])
    for size in args.sizes:
        data = args.work / f"q{size}"
        meta = generate(data, size)
        forget(data / "scale")
        runs: dict[str, int] = {}
        for step in args.steps:
            runs[step] = runs.get(step, 0) + 1
            out = data / f"out-{step}-{runs[step]}-{os.getpid()}"
            shutil.rmtree(out, ignore_errors=True)
            cmd, until = step_command(step, data, out, args.nproc)
            if step == "pack" and subprocess.run([*cmd[:3], "data", "pack", "--help"], env=env,
                                                 capture_output=True).returncode != 0:
                continue  # code from before the packed store
            result = measure(cmd, env, until)
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps({"label": args.label, "size": size, "val": meta["val"], "videos": meta["videos"],
                              "step": step, "run": runs[step], "nproc": args.nproc if step in ("train", "eval") else 1,
                              **result}), flush=True)


if __name__ == "__main__":
    main()
