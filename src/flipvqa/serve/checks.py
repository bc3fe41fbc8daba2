"""The checks on what a request says (JSON or form fields), each failing as a one-line 4xx.

Text is checked here, before it reaches the tokenizer: a lone UTF-16 surrogate (``"\\ud800"`` in
JSON, or a form field in a charset such as UTF-7) is no text sentencepiece can encode, and no
JSON response could echo it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..prompts import LETTERS

MAX_QUESTION = 2000  # characters
MAX_CHOICE = 1000


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(one_line(message))
        self.status = status


def one_line(message: Any) -> str:
    """``message`` on one line, safe to encode as UTF-8 (a lone surrogate becomes ``\\ud800``)."""
    text = " ".join(str(message).split()) or "error"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def check_text(text: str, what: str) -> None:
    """Refuse a string that is not Unicode text: a lone surrogate cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{what} holds a lone UTF-16 surrogate ({ascii(text[err.start])[1:-1]} at "
                                f"character {err.start + 1}), which is not text: send valid Unicode") from None


def check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise RequestError(400, f"\"question\" must be a string, not {json_type(question)}")
    check_text(question, "the question")
    if not question.strip():
        raise RequestError(400, "the question is empty")
    if len(question) > MAX_QUESTION:
        raise RequestError(400, f"the question is {len(question)} characters long, more than {MAX_QUESTION}")
    return question.strip()


def check_choices(choices: Any) -> list[str]:
    """The choices, stripped as the model reads them; two that are equal but for case count as
    the same answer (the model would split one answer's probability between them)."""
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        what = json_type(choices) if not isinstance(choices, list) else "a list with non-strings"
        raise RequestError(400, f"\"choices\" must be a list of strings, not {what}")
    if not 2 <= len(choices) <= len(LETTERS):
        raise RequestError(400, f"give 2 to {len(LETTERS)} choices (got {len(choices)})")
    seen: dict[str, int] = {}
    for k, choice in enumerate(choices):
        check_text(choice, f"choice {k + 1}")
        if not choice.strip():
            raise RequestError(400, f"choice {k + 1} is empty")
        if len(choice) > MAX_CHOICE:
            raise RequestError(400, f"choice {k + 1} is {len(choice)} characters long, more than {MAX_CHOICE}")
        first = seen.setdefault(choice.strip().casefold(), k)
        if first != k:
            raise RequestError(400, f"choices {first + 1} and {k + 1} are the same answer ({choice.strip()[:80]!r}; "
                                    "compared without surrounding spaces and case): give each answer once")
    return [c.strip() for c in choices]


def check_subtitles(path: Path) -> None:
    from ..data.subtitles import tvqa_dialogue

    try:
        tvqa_dialogue(path, -1000, 1000)
    except Exception as err:  # pysrt raises what its parser meets
        raise RequestError(400, f"subtitles: not a readable .srt file ({first_line(err)})") from None


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
