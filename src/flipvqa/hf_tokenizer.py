"""Hugging Face ``tokenizer.json`` (Llama 3's and Qwen's byte-level BPE, converted SentencePiece
models, ...) behind the :class:`flipvqa.tokenizer.Tokenizer` interface.

BOS/EOS are not in ``tokenizer.json`` itself; they come from the files ``transformers`` writes
beside it (see :data:`TOKEN_FILES` and :data:`MODEL_FILES`). A model without a BOS token (Qwen's)
gets ``bos_id = None`` and its prompts start directly with the instruction (:mod:`flipvqa.prompts`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .io import read_json
from .errors import FlipVQAError

# Where BOS/EOS are looked up, in order; the first file that names the token decides (an explicit
# null there means "none"). Token files give strings, model files give ids. A model file is read for
# BOS only when no token file is there: a tokenizer_config.json that names no bos_token describes a
# tokenizer without one, as transformers reads it (Qwen's config.json still carries a bos_token_id).
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("config.json", "generation_config.json")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise FlipVQAError(f"{path}: reading tokenizer.json needs the tokenizers package "
                               f"(pip install tokenizers)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FlipVQAError(f"{self.path}: tokenizer file not found")
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise FlipVQAError(f"{self.path}: not a Hugging Face tokenizer.json ({exc})") from None
        # Text is data: a literal "<|end_of_text|>" in a subtitle must not become the special token
        # (SentencePiece never parses special tokens out of text either). tokenizers >= 0.15.1.
        if hasattr(self.tok, "encode_special_tokens"):
            self.tok.encode_special_tokens = True
        self.n_words = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        template_bos, template_eos = self._template_specials()
        self.bos_id: Optional[int] = self._special("bos", template_bos)
        eos = self._special("eos", template_eos)
        if eos is None:
            raise FlipVQAError(f"{self.path}: no EOS token (set eos_token in tokenizer_config.json "
                               f"beside it); the prompts end with EOS")
        self.eos_id: int = eos
        self.stop_ids: tuple[int, ...] = (eos, *self._generation_stops())
        # Prefer the byte piece, as SentencePieceTokenizer does, so that tokenizer.model and a
        # converted tokenizer.json of the same model give the same id (13 for LLaMA).
        byte_newline = self.tok.token_to_id("<0x0A>")
        newline = self.encode("\n")
        if byte_newline is None and not newline:
            raise FlipVQAError(f"{self.path}: cannot encode a line break")
        self.newline_id: int = byte_newline if byte_newline is not None else newline[-1]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _generation_stops(self) -> tuple[int, ...]:
        """Every id of ``generation_config.json``'s ``eos_token_id`` (chat models list several)."""
        file = self.path.parent / "generation_config.json"
        data = read_json(file) if file.is_file() else {}
        ids = data.get("eos_token_id") if isinstance(data, dict) else None
        ids = ids if isinstance(ids, list) else [ids]
        return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_words)

    def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # ``tokenizers`` reports offsets in characters of ``text`` (also for byte-level BPE, where
        # every byte token of one multi-byte character gets that character's span).
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [(int(s), int(e)) for s, e in enc.offsets]

    def _template_specials(self) -> tuple[Optional[int], Optional[int]]:
        """The single token the post-processor adds before / after the text, if any (Llama 3's
        template adds ``<|begin_of_text|>``); the last resort when no file names BOS/EOS."""
        plain = self.encode("a")
        full = self.tok.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                before, after = full[:i], full[i + len(plain):]
                return (before[0] if len(before) == 1 else None, after[0] if len(after) == 1 else None)
        return None, None

    def _special(self, which: str, fallback: Optional[int]) -> Optional[int]:
        token_files = [self.path.parent / n for n in TOKEN_FILES if (self.path.parent / n).is_file()]
        for file in token_files:
            data = self._side_file(file)
            key = f"{which}_token"
            if key not in data:
                continue
            value: Any = data[key]
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            if value is None:
                return None
            token_id = self.tok.token_to_id(str(value))
            if token_id is None:
                raise FlipVQAError(f"{file}: {key} {value!r} is not in {self.path.name}")
            return token_id
        if which == "bos" and token_files:
            return fallback
        for file in (self.path.parent / n for n in MODEL_FILES):
            if not file.is_file():
                continue
            data, key = self._side_file(file), f"{which}_token_id"
            if key not in data:
                continue
            value = data[key]
            if isinstance(value, list):  # generation configs may list several EOS ids
                value = value[0] if value else None
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.n_words:
                raise FlipVQAError(f"{file}: {key} {value!r} is not a token id of {self.path.name}")
            return value
        return fallback

    @staticmethod
    def _side_file(file: Path) -> dict:
        data = read_json(file)
        if not isinstance(data, dict):
            raise FlipVQAError(f"{file}: expected a JSON object")
        return data
