"""What a training run keeps in its output folder so that it survives being killed.

``checkpoint_last.pth`` holds everything a run needs to go on as if it had never stopped: the
trainable weights, the optimizer (and loss scaler), where the run is (:class:`Progress`: the epoch,
the batches of it done, the optimizer steps so far, the epoch's partial log sums, the best
accuracy), the random number generators and the run options. It is written atomically at every
epoch end, every ``--save_every`` optimizer steps and when the run is stopped by a signal, always
at an optimizer-step boundary: a kill inside an accumulation repeats that accumulation.

``log.txt`` and ``metrics.jsonl`` may hold lines written after the last state (a kill between the
two writes): a resumed run first cuts them back to the state, so no epoch or step appears twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import FlipVQAError, Interrupted  # noqa: F401 (Interrupted: re-exported)
from .io import read_jsonl, save_torch, write_jsonl

log = logging.getLogger(__name__)

LAST, BEST, LOG, METRICS, RUN = "checkpoint_last.pth", "checkpoint_best.pth", "log.txt", "metrics.jsonl", "run.json"
PREDICTIONS, TENSORBOARD = "predictions_val.jsonl", "tensorboard"
# Options a resumed run must share with the state it continues (else the data order or the
# meaning of a step would change).
SAME_ON_RESUME = ("dataset", "batch_size", "accum_iter", "max_seq_len", "max_feats", "vaq", "qav", "sub")


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress
    step: int = 0  # its batches done (always at an optimizer-step boundary, or all of them)
    global_step: int = 0  # optimizer steps of the whole run
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's log sums so far
    skipped: int = 0  # non-finite batches skipped in this epoch
    skipped_total: int = 0  # and in the whole run (--skip_nonfinite bounds it)
    best_acc: float = 0.0
    best_epoch: Optional[int] = None
    world_size: int = 1


# ---------------------------------------------------------------------------- the state file
def save_state(out: Path, model, optimizer, scaler, progress: Progress, args: argparse.Namespace) -> None:
    save_torch(out / LAST, {
        "model": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {},
        # "epoch": the last finished epoch, as in checkpoint_best.pth (what --resume FILE reads)
        "epoch": progress.epoch - 1, "progress": asdict(progress), "rng": _rng_state(), "args": args})


def progress_of(ckpt: dict) -> Optional[Progress]:
    """The :class:`Progress` of a ``checkpoint_last.pth``; None for other checkpoints."""
    saved = ckpt.get("progress")
    return Progress(**saved) if isinstance(saved, dict) else None


def restore_rng(ckpt: dict) -> None:
    state = ckpt.get("rng") or {}
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all(state["cuda"])


def check_same_run(path: Path, saved: dict, args: argparse.Namespace, world_size: int, progress: Progress) -> None:
    for key in SAME_ON_RESUME:
        if key in saved and saved[key] != getattr(args, key):
            raise FlipVQAError(f"{path} was written with --{key} {saved[key]}, this run has {getattr(args, key)}: "
                               f"resume with the same options, or start over with --overwrite")
    if progress.world_size != world_size:
        raise FlipVQAError(f"{path} was written by {progress.world_size} processes, this run has {world_size}: "
                           f"the data order would change; resume with as many, or start over with --overwrite")


def _rng_state() -> dict[str, Any]:
    """The generators' states as tensors and numbers only (what a weights-only load accepts)."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# ---------------------------------------------------------------------------- the output folder
def prepare_output_dir(out: Path, fresh: bool, overwrite: bool) -> None:
    """A run that starts at epoch 0 must not mix with an earlier run's files: stop unless
    ``--overwrite`` (which removes them); continuing (``fresh`` False) keeps them."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # what a write killed before its rename left (io.write_atomic)
        stale.unlink(missing_ok=True)
    earlier = [name for name in (LOG, LAST) if (out / name).exists()]
    if not fresh or not earlier:
        return
    if not overwrite:
        raise FlipVQAError(f"{out} already holds a run ({', '.join(earlier)}): continue it with --resume auto, "
                           f"or start over with --overwrite")
    for name in (LOG, METRICS, LAST, BEST, PREDICTIONS, RUN):
        (out / name).unlink(missing_ok=True)
    for event_file in (out / TENSORBOARD).glob("events.out.tfevents.*"):
        event_file.unlink()
    log.info("%s: --overwrite: removed the earlier run's files", out)


def cut_records(out: Path, epoch: int, global_step: int) -> list[dict]:
    """Keep the ``log.txt`` lines of epochs before ``epoch`` and the ``metrics.jsonl`` lines of
    steps up to ``global_step``: what a resumed run redoes is written again, once. Returns the
    kept log lines."""
    kept_log = [e for e in _lines(out / LOG) if isinstance(e, dict) and e.get("epoch", -1) < epoch]
    if (out / LOG).exists():
        write_jsonl(out / LOG, kept_log)
    if (out / METRICS).exists():
        write_jsonl(out / METRICS, [m for m in _lines(out / METRICS) if m.get("step", 0) <= global_step])
    return kept_log


def best_of(kept_log: list[dict], out: Path) -> tuple[float, Optional[int]]:
    """The best validation accuracy of the earlier epochs in this folder (when their best
    checkpoint is there): a run resumed into it only replaces checkpoint_best.pth when better."""
    if not (out / BEST).exists() or not kept_log:
        return 0.0, None
    best = max(kept_log, key=lambda e: (e.get("val_acc", 0.0), -e["epoch"]))  # ties: the earlier epoch
    return float(best.get("val_acc", 0.0)), int(best["epoch"])


def _lines(path: Path) -> list:
    return read_jsonl(path) if path.exists() else []


def write_run_json(out: Path, args: argparse.Namespace) -> None:
    from . import __version__

    (out / RUN).write_text(json.dumps({"flipvqa": __version__, "args": vars(args)}, indent=1, default=str))


# ---------------------------------------------------------------------------- signals
class StopSignals:
    """While active, SIGTERM and SIGINT (what SLURM and Ctrl-C send) only set ``requested``; the
    training loop checks it and stops at the next safe point. A second signal stops at once."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping at the next safe point (send it again to stop at once)", self.requested)

    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.requested or "SIGTERM"))
