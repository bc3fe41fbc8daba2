"""Encoded samples and their batches.

Every sample is encoded once, up front (so overflow is reported as one count), into flat arrays
(:mod:`flipvqa.data.encoded`), cached on disk when a cache place is given
(:mod:`flipvqa.data.cache`). Batches are padded only to their longest sequence: padding never
changes a number, because attention is causal and pads are never targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Sequence as Records
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import FlipVQAError
from ..io import progress
from ..model.inputs import Batch, TaskBatch
from ..prompts import TASKS, Sequence, encode_sample, open_prompt_text, prompt_text
from ..tokenizer import Tokenizer
from .cache import CachePlace, cached_encoding
from .encoded import EncodedSplit, EncodedView, SplitBuilder
from .records import FEATURE_DIM, Record, frames_to_slots
from .table import RecordTable

log = logging.getLogger(__name__)


@dataclass
class Item:
    record: Record
    video: Tensor  # [max_feats, 768]
    video_len: int
    sequences: dict[str, list[Sequence]]


class VQADataset(Dataset):
    """Records encoded into the three sequences (training: the correct letter; evaluation:
    every option, VQA only unless ``tasks`` says otherwise)."""

    def __init__(self, records: Records[Record], tokenizer: Tokenizer, n_options: Optional[int], max_feats: int,
                 max_seq_len: int, sub: bool, train: bool, tasks: tuple[str, ...] = TASKS,
                 name: str = "", feature_dim: int = FEATURE_DIM, cache: Optional[CachePlace] = None):
        """``n_options``: the count every question has (a built-in dataset's), or None for each
        question's own; ``feature_dim``: the width of a missing video's zero frame; ``cache``:
        where the encoding is cached (None: encoded every time)."""
        self.records, self.max_feats, self.feature_dim = records, max_feats, feature_dim
        self.tasks = tasks
        if train and not (records.all_answered() if isinstance(records, RecordTable)
                          else all(r.answered for r in records)):
            raise FlipVQAError(f"{name or 'dataset'}: questions without an answer cannot be trained on")
        options = {"max_feats": max_feats, "max_seq_len": max_seq_len, "sub": sub, "train": train,
                   "tasks": list(tasks), "n_options": n_options}

        def encode() -> EncodedSplit:
            return _encode(records, tokenizer, n_options, max_feats, max_seq_len, sub, train, tasks, name)

        self.encoding = encode() if cache is None else \
            cached_encoding(records, tokenizer, options, cache, encode, name or "dataset")
        self.n_truncated = self.encoding.n_truncated()
        self._check_fit(name, max_seq_len)
        if self.n_truncated:
            log.warning("%s: %d of %d questions are longer than --max_seq_len %d and were truncated",
                        name or "dataset", self.n_truncated, len(records), max_seq_len)

    @property
    def encoded(self) -> EncodedView:
        """Question i's ``{task: [Sequence, ...]}`` (made on demand from the arrays)."""
        return EncodedView(self.encoding)

    def _check_fit(self, name: str, max_seq_len: int) -> None:
        """A question truncated so far that no answer token (or not the whole video) is left
        would give a NaN loss or score: stop, and say what --max_seq_len it needs."""
        bad = self.encoding.unfit(self.max_feats)
        if not len(bad):
            return
        questions = self.encoding.question_of(bad)
        rec = self.records[int(questions[0])]
        count = len({self.records[int(q)].index for q in set(questions.tolist())})
        raise FlipVQAError(f"{name or 'dataset'}: the prompt does not fit --max_seq_len {max_seq_len} "
                           f"({count} questions, e.g. index {rec.index}, video {rec.vid}, "
                           f"lose (part of) their answer or video); the longest sequence needs "
                           f"--max_seq_len {self.encoding.longest()}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        video, video_len = frames_to_slots(rec.frames, self.max_feats, self.feature_dim)
        return Item(rec, video, video_len, self.encoded[i])


def _encode(records: list[Record], tokenizer: Tokenizer, n_options: Optional[int], max_feats: int,
            max_seq_len: int, sub: bool, train: bool, tasks: tuple[str, ...], name: str) -> EncodedSplit:
    """Every record's sequences (encode_sample), appended to flat arrays as they come."""
    builder = SplitBuilder(tokenizer.n_words)
    for rec in progress(records, f"tokenizing {name}".strip(), enabled=len(records) >= 2000):
        text = open_prompt_text(rec.question, rec.dialogue) if rec.open_ended else \
            prompt_text(rec.question, rec.options, rec.dialogue)
        count = len(rec.options) if n_options is None else n_options
        # evaluation needs no answer: every option is scored, or the answer generated
        answer = rec.target if rec.answered else ("" if rec.open_ended else 0)
        try:
            builder.add(encode_sample(tokenizer, text, answer, count, max_feats, max_seq_len, sub, tasks,
                                      all_options=not train))
        except FlipVQAError as exc:  # name the question
            raise FlipVQAError(f"{name or 'dataset'}: question {rec.index} (video {rec.vid}): {exc}") from None
    return builder.finish()


def collate(items: list[Item], pad_to: Optional[int] = None) -> Batch:
    """Stack items; sequences are padded to the longest in the batch (or to ``pad_to``). A
    question with fewer option sequences than the batch's most repeats its last one (scored and
    then dropped by the caller, see ``Batch.n_options``), so the model sees equal counts.

    In evaluation, multiple-choice questions bring ``"vqa"`` option sequences and open-ended
    ones a ``"prompt"``: each task's batch then covers only its questions (``Batch.rows``)."""
    tasks, rows = {}, {}
    names = list(dict.fromkeys(task for item in items for task in item.sequences))
    for task in names:
        mine = [i for i, item in enumerate(items) if task in item.sequences]
        if len(mine) < len(items):
            rows[task] = torch.tensor(mine)
        most = max(len(items[i].sequences[task]) for i in mine)
        seqs = [s for i in mine for s in _padded(items[i].sequences[task], most)]
        width = pad_to or max(len(s.ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s.ids)] = torch.tensor(s.ids)
        tasks[task] = TaskBatch(ids, torch.tensor([s.label_start for s in seqs]),
                                torch.tensor([len(s.ids) for s in seqs]),
                                torch.tensor([s.video_start for s in seqs]))
    counts = [len(item.sequences["vqa"]) for item in items if "vqa" in item.sequences] or [1]
    n_options = torch.tensor(counts) if len(set(counts)) > 1 else None
    return Batch(video=torch.stack([item.video for item in items]), tasks=tasks,
                 answer=torch.tensor([-1 if item.record.answer is None else item.record.answer for item in items]),
                 qtype=torch.tensor([item.record.qtype if isinstance(item.record.qtype, int) else -1
                                     for item in items]),
                 records=[item.record for item in items], n_options=n_options, rows=rows)


def _padded(seqs: list[Sequence], count: int) -> list[Sequence]:
    return seqs + [seqs[-1]] * (count - len(seqs))
