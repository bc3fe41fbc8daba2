"""The three Flipped-VQA token sequences, as pure functions of a sample's text.

VQA predicts the answer letter, VAQ the question and QAV the video frames, each from the other two
parts of the same <video, question, answer> triplet. The templates, the video placeholder slots and
the overflow rules are the reference's (docs/faithfulness.md: "Prompts", "Positions", "Overflow and
labels"). Positions (where the video sits, where the targets start) come from the tokenized segments
and character spans, never from hard-coded token ids, so any tokenizer works.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Optional

from .errors import FlipVQAError
from .tokenizer import Tokenizer

LETTERS = tuple(f"({chr(ord('A') + k)})" for k in range(26))  # (A) .. (Z): at most 26 options
TASKS = ("vqa", "vaq", "qav")
VIDEO_SLOT = 0  # placeholder id of a video slot; the model replaces its embedding

INSTRUCTIONS = {
    ("vqa", False): "Instruction: Predict the answer based on the video and question.\n",
    ("vaq", False): "Instruction: Predict the question based on the video and answer.\n",
    ("qav", False): "Instruction: Predict the video based on the question and answer.\n",
    ("vqa", True): "Instruction: Predict the answer based on the dialogue, video and question.\n",
    ("vaq", True): "Instruction: Predict the question based on the dialogue, video and answer.\n",
    ("qav", True): "Instruction: Predict the video based on the dialogue, question and answer.\n",
}


@dataclass(frozen=True)
class PromptText:
    question: str  # "Question: ...?\n"
    choices: str  # "Choices: \n(A) ...\n(B) ...\n"; "" for an open-ended question
    answer: str  # "Answer: The answer is "
    dialogue: str  # "Dialogue: ...\n" or "" (only with subtitles)


@dataclass(frozen=True)
class Sequence:
    """One token sequence. Targets are the tokens at positions ``label_start .. len(ids)-1``
    (QAV: the frame indices at the ``max_feats`` video slots that start at ``video_start``)."""

    ids: list[int]
    label_start: int
    video_start: int
    truncated: bool = False
    full_length: int = 0  # before truncation (0: not truncated, len(ids))
    lost_answer: bool = False  # an open-ended answer token (or a generation prompt token) was cut

    def fits(self, max_feats: int, task: str) -> bool:
        """Whether truncation left the sequence usable: its video slots whole, nothing of an
        open-ended answer or prompt cut and, for VQA/VAQ, at least one target token."""
        if self.video_start + max_feats > len(self.ids) or self.lost_answer:
            return False
        return task in ("qav", "prompt") or self.label_start < len(self.ids)


def normalize_question(raw: str) -> str:
    """``raw.capitalize().strip()`` with a question mark, as the reference writes questions."""
    question = str(raw).capitalize().strip()
    return question if question.endswith("?") else question + "?"


def prompt_text(question: str, options: list[str], dialogue: str = "") -> PromptText:
    """The text fields of a multiple-choice question (2 to 26 ``options``)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise FlipVQAError(f"{len(options)} options: 2 to {len(LETTERS)} are supported")
    choices = "Choices: \n" + "".join(f"{LETTERS[k]} {opt}\n" for k, opt in enumerate(options))
    return PromptText(f"Question: {question}\n", choices, "Answer: The answer is ", dialogue)


def open_prompt_text(question: str, dialogue: str = "") -> PromptText:
    """The text fields of an open-ended question: no choices (docs/faithfulness.md, "Open-ended
    questions")."""
    return PromptText(f"Question: {question}\n", "", "Answer: The answer is ", dialogue)


def _bos(tok: Tokenizer) -> list[int]:
    """``[bos_id]``, or nothing for a tokenizer without BOS (some Hugging Face models)."""
    return [] if tok.bos_id is None else [tok.bos_id]


# Per tokenizer, the ids of the texts every question shares (the instruction heads).
_constants: "weakref.WeakKeyDictionary[Tokenizer, dict[str, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


def _encode_constant(tok: Tokenizer, text: str) -> list[int]:
    """``tok.encode(text)`` for a text that every question shares: encoded once per tokenizer."""
    try:
        memo = _constants.setdefault(tok, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: no memo
        return tok.encode(text)
    if text not in memo:
        memo[text] = tuple(tok.encode(text))
    return list(memo[text])


def _dialogue_ids(tok: Tokenizer, text: PromptText, sub: bool) -> list[int]:
    return tok.encode(text.dialogue) if sub and text.dialogue else []


def _encode_from(tok: Tokenizer, text: str, char_start: int) -> tuple[list[int], int]:
    """Encode ``text``; also return the index of the first token that reaches past ``char_start``
    (a token straddling the boundary, such as LLaMA's '▁(' for ' (B)', belongs to the targets)."""
    ids, spans = tok.encode_with_spans(text)
    first = next((i for i, (_, end) in enumerate(spans) if end > char_start), len(ids))
    return ids, first


def build(tok: Tokenizer, task: str, text: PromptText, answer: int | str, max_feats: int,
          max_seq_len: int, sub: bool, dialogue: Optional[list[int]] = None) -> Sequence:
    """Build one ``task`` sequence and fit it into ``max_seq_len``. ``answer``: the index of a
    multiple-choice question's letter, or an open-ended question's answer text. ``dialogue``:
    the dialogue's ids when the caller has them (every task and option shares them)."""
    slots = [VIDEO_SLOT] * max_feats
    instruction = INSTRUCTIONS[(task, sub)]
    if dialogue is None:
        dialogue = _dialogue_ids(tok, text, sub)
    is_open = isinstance(answer, str)
    target = answer if is_open else LETTERS[answer]
    qa = text.question + text.choices + text.answer + target
    if task == "qav":
        head = _bos(tok) + _encode_constant(tok, instruction)
        if sub:
            body = tok.encode(qa + "\nVideo:")
            ids = head + dialogue + body + slots + [tok.eos_id]
            span = (len(head), len(head) + len(dialogue))
        else:  # the reference encodes instruction and question in one string here
            ids = _bos(tok) + tok.encode(instruction + qa + "\nVideo:") + slots + [tok.eos_id]
            span = None
        start = len(ids) - max_feats - 1
        return _fit(ids, start, start, span, max_feats, max_seq_len, task)
    head = _bos(tok) + _encode_constant(tok, instruction + "Video:")
    video_start = len(head)
    if task == "vqa":
        # An open answer's targets are every token after "The answer is" (with LLaMA's tokenizer
        # a leading digit comes as a lone "▁" piece, which is a target too); a letter's start at
        # the token reaching past the space, as the reference's "▁(".
        body_text, target_char = qa, len(qa) - len(target) - (1 if is_open else 0)
    else:  # vaq: the question, with its "Question:" label, comes last and is the target
        question = text.question.strip()
        body_text = text.choices + text.answer + target + "\n" + question
        target_char = len(body_text) - len(question) + len("Question:")
    body, first_target = _encode_from(tok, body_text, target_char)
    prefix = head + slots + [tok.newline_id]
    ids = prefix + dialogue + body + [tok.eos_id]
    span = (len(prefix), len(prefix) + len(dialogue)) if sub else None
    seq = _fit(ids, len(prefix) + len(dialogue) + first_target, video_start, span, max_feats,
               max_seq_len, task)
    if is_open and task == "vqa" and seq.truncated and span is None and len(seq.ids) < len(ids) - 1:
        return dataclasses.replace(seq, lost_answer=True)  # a cut answer would teach a wrong one
    return seq


def generation_prompt(tok: Tokenizer, text: PromptText, max_feats: int, max_seq_len: int,
                      sub: bool) -> Sequence:
    """The VQA sequence of an open-ended question up to its first target: ``... Answer: The
    answer is`` (no trailing space; the answer's first token brings it). A dialogue that does not
    fit is cut at its tail; a prompt that does not fit otherwise is marked ``lost_answer``.
    ``label_start`` is where the first generated token goes."""
    head = _bos(tok) + _encode_constant(tok, INSTRUCTIONS[("vqa", sub)] + "Video:")
    prefix = head + [VIDEO_SLOT] * max_feats + [tok.newline_id]
    dialogue = _dialogue_ids(tok, text, sub)
    body = tok.encode(text.question + text.answer.rstrip())
    full = len(prefix) + len(dialogue) + len(body)
    if full > max_seq_len:
        keep = max_seq_len - len(prefix) - len(body)
        if not dialogue or keep < 0:
            ids = (prefix + dialogue + body)[:max_seq_len]
            return Sequence(ids, len(ids), len(head), truncated=True, full_length=full, lost_answer=True)
        ids = prefix + dialogue[:keep] + body
        return Sequence(ids, len(ids), len(head), truncated=True, full_length=full)
    ids = prefix + dialogue + body
    return Sequence(ids, len(ids), len(head))


def _fit(ids: list[int], label_start: int, video_start: int, dialogue: Optional[tuple[int, int]],
         max_feats: int, max_len: int, task: str) -> Sequence:
    """Apply the reference's overflow rule (docs/faithfulness.md, "Overflow and labels")."""
    if len(ids) <= max_len:
        return Sequence(ids, label_start, video_start)
    if dialogue is not None and dialogue[0] != dialogue[1]:
        # Cut the dialogue's tail so that what follows it fits. When even that is too long
        # ("keep" < 0), the reference overwrites the tokens just before the dialogue.
        d_start, d_end = dialogue
        tail = ids[d_end:]
        if len(tail) > max_len:
            raise FlipVQAError(f"the text after the dialogue needs {len(tail)} tokens, more than "
                               f"--max_seq_len {max_len}")
        keep = max_len - (d_start + len(tail))
        head = (ids[:d_start] + ids[d_start:d_start + max(keep, 0)])[: max_len - len(tail)]
        shift = len(ids) - max_len
        new_video_start = video_start - shift if task == "qav" else video_start
        return Sequence(head + tail, label_start - shift, new_video_start, truncated=True, full_length=len(ids))
    # A cut through the video slots (QAV's sit at the end) is caught by Sequence.fits.
    return Sequence(ids[:max_len], label_start, video_start, truncated=True, full_length=len(ids))


def encode_sample(tok: Tokenizer, text: PromptText, answer: int | str, n_options: int, max_feats: int,
                  max_seq_len: int, sub: bool, tasks=TASKS, all_options: bool = False
                  ) -> dict[str, list[Sequence]]:
    """Sequences per task: one with the correct letter or open answer (training), or one per
    option (``all_options``, evaluation; an open-ended question has instead its generation
    prompt, under the key ``"prompt"``)."""
    if isinstance(answer, str) and all_options:
        return {"prompt": [generation_prompt(tok, text, max_feats, max_seq_len, sub)]}
    letters = range(n_options) if all_options else [answer]
    dialogue = _dialogue_ids(tok, text, sub)  # once: every task and option shares it
    return {task: [build(tok, task, text, k, max_feats, max_seq_len, sub, dialogue) for k in letters]
            for task in tasks}
