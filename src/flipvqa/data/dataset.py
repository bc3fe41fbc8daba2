"""Encoded samples and their batches.

Every sample is encoded once, up front (so overflow is reported as one count), and batches are
padded only to their longest sequence: padding never changes a number, because attention is
causal and pads are never targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..prompts import TASKS, Sequence, encode_sample, prompt_text
from ..tokenizer import Tokenizer
from .records import Record, frames_to_slots

log = logging.getLogger(__name__)


@dataclass
class Item:
    record: Record
    video: Tensor  # [max_feats, 768]
    video_len: int
    sequences: dict[str, list[Sequence]]


@dataclass
class TaskBatch:
    ids: Tensor  # (n_seq, seq) token ids, video slots and pads 0
    label_start: Tensor  # (n_seq,) first target position
    length: Tensor  # (n_seq,) unpadded length
    video_start: Tensor  # (n_seq,) first video slot

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=True) for t in
                           (self.ids, self.label_start, self.length, self.video_start)))


@dataclass
class Batch:
    video: Tensor  # (batch, max_feats, 768)
    tasks: dict[str, TaskBatch]  # per task: batch * n_seq_per_question sequences, question-major
    answer: Tensor  # (batch,)
    qtype: Tensor  # (batch,)
    records: list[Record] = field(default_factory=list)

    def to(self, device) -> "Batch":
        return Batch(self.video.to(device, non_blocking=True),
                     {k: v.to(device) for k, v in self.tasks.items()},
                     self.answer.to(device), self.qtype.to(device), self.records)


class VQADataset(Dataset):
    """Records encoded into the three sequences (training: the correct letter; evaluation:
    every option, VQA only unless ``tasks`` says otherwise)."""

    def __init__(self, records: list[Record], tokenizer: Tokenizer, n_options: int, max_feats: int,
                 max_seq_len: int, sub: bool, train: bool, tasks: tuple[str, ...] = TASKS,
                 name: str = ""):
        self.records, self.max_feats = records, max_feats
        self.tasks = tasks
        self.encoded = []
        progress = tqdm(records, desc=f"tokenizing {name}".strip(), disable=len(records) < 2000,
                        leave=False)
        for rec in progress:
            text = prompt_text(rec.question, rec.options, rec.dialogue)
            self.encoded.append(encode_sample(tokenizer, text, rec.answer, n_options, max_feats,
                                              max_seq_len, sub, tasks, all_options=not train))
        self.n_truncated = sum(any(s.truncated for seqs in enc.values() for s in seqs)
                               for enc in self.encoded)
        if self.n_truncated:
            log.warning("%s: %d of %d questions are longer than --max_seq_len %d and were truncated",
                        name or "dataset", self.n_truncated, len(records), max_seq_len)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        video, video_len = frames_to_slots(rec.frames, self.max_feats)
        return Item(rec, video, video_len, self.encoded[i])


def collate(items: list[Item], pad_to: Optional[int] = None) -> Batch:
    """Stack items; sequences are padded to the longest in the batch (or to ``pad_to``)."""
    tasks = {}
    for task in items[0].sequences:
        seqs = [s for item in items for s in item.sequences[task]]
        width = pad_to or max(len(s.ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s.ids)] = torch.tensor(s.ids)
        tasks[task] = TaskBatch(ids, torch.tensor([s.label_start for s in seqs]),
                                torch.tensor([len(s.ids) for s in seqs]),
                                torch.tensor([s.video_start for s in seqs]))
    return Batch(video=torch.stack([item.video for item in items]), tasks=tasks,
                 answer=torch.tensor([item.record.answer for item in items]),
                 qtype=torch.tensor([item.record.qtype for item in items]),
                 records=[item.record for item in items])
