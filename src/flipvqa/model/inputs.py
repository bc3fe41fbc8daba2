"""What the model consumes: token sequences per task and the video, batched.

The data side (:mod:`flipvqa.data.dataset`) builds these; the model imports nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

# Width of a frame feature when nothing says otherwise: CLIP ViT-L/14 image embeddings, what the
# released features hold and the authors' visual_proj takes.
FEATURE_DIM = 768


@dataclass
class TaskBatch:
    ids: Tensor  # (n_seq, seq) token ids, video slots and pads 0
    label_start: Tensor  # (n_seq,) first target position
    length: Tensor  # (n_seq,) unpadded length
    video_start: Tensor  # (n_seq,) first video slot

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=True) for t in
                           (self.ids, self.label_start, self.length, self.video_start)))

    def rows(self, index: Tensor | slice) -> "TaskBatch":
        """The sequences ``index`` of this batch."""
        return TaskBatch(self.ids[index], self.label_start[index], self.length[index], self.video_start[index])


@dataclass
class Batch:
    video: Tensor  # (batch, max_feats, feature_dim)
    tasks: dict[str, TaskBatch]  # per task: batch * n_seq_per_question sequences, question-major
    answer: Tensor  # (batch,) -1 where unknown
    qtype: Tensor  # (batch,) -1 where none (or a name, kept in the records)
    records: list[Any] = field(default_factory=list)  # the questions' records, passed through untouched
    # (batch,) how many of a question's option sequences are real: questions with fewer options
    # than the batch's most repeat their last one, so every question has as many (None: all real).
    n_options: Optional[Tensor] = None
    # task -> which questions (indices into this batch) its sequences belong to, where not all:
    # in evaluation, multiple-choice questions have "vqa" option sequences and open-ended ones
    # a generation "prompt".
    rows: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device) -> "Batch":
        return Batch(self.video.to(device, non_blocking=True),
                     {k: v.to(device) for k, v in self.tasks.items()},
                     self.answer.to(device), self.qtype.to(device), self.records, self.n_options,
                     {k: v.to(device) for k, v in self.rows.items()})

    def part(self, task: str) -> "Batch":
        """The questions that have ``task`` sequences, as a batch of their own."""
        if task not in self.rows:
            return Batch(self.video, {task: self.tasks[task]}, self.answer, self.qtype, self.records,
                         self.n_options if task == "vqa" else None)
        rows = self.rows[task]
        return Batch(self.video[rows], {task: self.tasks[task]}, self.answer[rows], self.qtype[rows],
                     [self.records[i] for i in rows.tolist()], self.n_options if task == "vqa" else None)
