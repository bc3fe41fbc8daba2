"""What a training run writes as it goes, besides its checkpoints: ``log.txt`` (one line per
epoch, the reference's keys), ``metrics.jsonl`` (one line per optimizer step) and, with
``--tensorboard``, TensorBoard event files under ``<output_dir>/tensorboard``. Only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import FlipVQAError
from .runstate import LOG, METRICS, TENSORBOARD


class RunLog:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool, first_step: int):
        """``first_step``: the first optimizer step this process will write (after a resume,
        TensorBoard drops the earlier files' events from there on)."""
        self.out, self.enabled, self.writer = out, enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FlipVQAError("--tensorboard needs the tensorboard package "
                                   "(pip install 'flipvqa[tensorboard]' or pip install tensorboard)") from None
            self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=first_step)

    def step(self, global_step: int, epoch: int, metrics: dict) -> None:
        """One optimizer step: ``{"step", "epoch", "lr", "loss", "vqa_loss", "vaq_loss",
        "qav_loss", "grad_norm", "seconds"}``."""
        if not self.enabled:
            return
        line = {"step": global_step, "epoch": epoch, **metrics}
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, global_step)

    def epoch(self, entry: dict, per_type: dict[str, float], global_step: int) -> None:
        """One epoch's ``log.txt`` line, and its validation accuracy (overall and per type)."""
        if not self.enabled:
            return
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.writer:
            self.writer.add_scalar("val/acc", entry["val_acc"], global_step)
            for name, acc in per_type.items():
                self.writer.add_scalar(f"val/{name}", acc, global_step)
            self.writer.flush()

    def close(self, error: Optional[BaseException] = None) -> None:
        if self.writer:
            self.writer.close()
