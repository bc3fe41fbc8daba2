"""Tokenizers behind one small interface.

Prompt construction (:mod:`flipvqa.prompts`) needs token ids *and* the character span of each
token, so that it finds where the answer or the question starts from the text itself instead of
from LLaMA-specific token ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from .errors import FlipVQAError


class Tokenizer(Protocol):
    bos_id: Optional[int]  # None: the model has no BOS token and prompts start without one
    eos_id: int
    newline_id: int  # the id the prompts insert for the line break after the video
    n_words: int
    stop_ids: tuple[int, ...]  # generation ends at any of these: EOS, and a model's other end tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""

    def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, per token, its ``(start, end)`` character span in ``text``."""

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (a generated answer)."""


class SentencePieceTokenizer:
    """LLaMA-1/2 style SentencePiece model (``tokenizer.model``)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FlipVQAError(f"{path}: tokenizer file not found")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # sentencepiece raises bare RuntimeErrors/OSErrors
            raise FlipVQAError(f"{path}: not a SentencePiece model ({exc})") from None
        self.path = path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.n_words = self.sp.vocab_size()
        self.stop_ids = (self.eos_id,)
        # LLaMA inserts the byte piece for "\n" directly (id 13 in LLaMA's vocabulary).
        self.newline_id = self.sp.piece_to_id("<0x0A>")
        if self.newline_id == self.sp.unk_id():
            self.newline_id = self.encode("\n")[-1]

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        rows = [(p.id, (p.begin, p.end)) for p in self.sp.encode(text, out_type="proto").pieces]
        if not rows:
            return [], []
        ids, spans = zip(*rows)  # one pass over the pieces: reading their fields is the cost here
        if text.isascii():  # SentencePiece reports byte offsets: the same as character offsets here
            return list(ids), list(spans)
        begins, ends = zip(*spans)
        return list(ids), list(zip(byte_to_char(text, begins), byte_to_char(text, ends)))


def byte_to_char(text: str, offsets: Sequence[int]) -> list[int]:
    """UTF-8 byte offsets into ``text`` as character offsets: a byte inside a character maps to
    that character, the end of the text to ``len(text)``. Vectorised, because a Python loop over
    the characters cost more than the tokenization itself."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    char_of = np.empty(len(data) + 1, dtype=np.int64)
    np.cumsum((data & 0xC0) != 0x80, out=char_of[:-1])  # every byte but a continuation byte starts a character
    char_of[:-1] -= 1
    char_of[-1] = len(text)
    return char_of[np.asarray(offsets, dtype=np.int64)].tolist()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load ``tokenizer.model`` (SentencePiece) or ``tokenizer.json`` (Hugging Face); a folder
    is searched for either."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FlipVQAError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
    if path.suffix == ".json":
        from .hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
