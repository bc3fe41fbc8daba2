"""lmms-eval's requests as Flipped-VQA questions, without importing lmms-eval.

lmms-eval asks a model for one loss per option of a multiple-choice document, one request per
option, in a flat list that mixes documents and tasks. Flipped-VQA scores the options of a
question together (one prompt lists every choice), so :func:`group_options` gathers the requests
of each document back into one question. :func:`generation_settings` reads a ``generate_until``
request's generation kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..errors import FlipVQAError
from ..prompts import LETTERS

# What every lmms-eval request of a task carries after its own arguments.
DOC_ARGS = ("doc_to_visual", "doc_id", "task", "split")


@dataclass
class ChoiceQuestion:
    """One multiple-choice document: its context (the question), its options in lmms-eval's
    order and where its video comes from."""

    task: str
    split: str
    doc_id: Any
    context: str
    doc_to_visual: Optional[Callable]
    options: dict[int, str] = field(default_factory=dict)  # request idx -> continuation, stripped

    @property
    def where(self) -> str:
        return f"task {self.task}, doc {self.doc_id}"

    def option_list(self) -> list[str]:
        return [self.options[k] for k in range(len(self.options))]


def group_options(requests: Sequence[Any]) -> tuple[list[ChoiceQuestion], list[tuple[int, int]]]:
    """The documents of ``loglikelihood`` requests, in order of first appearance, and for each
    request (repeats included) ``(question number, option number)``. A request that does not name
    its document, or a document whose option set cannot be recovered, is a :class:`FlipVQAError`."""
    questions: dict[tuple, ChoiceQuestion] = {}
    where: list[tuple[tuple, int]] = []
    for request in requests:
        key, question = _choice_request(request)
        known = questions.setdefault(key, question)
        if known.context != question.context:
            raise FlipVQAError(f"{known.where}: its options come with different contexts (a multiple_input task?); "
                               "flipvqa needs one question and its options as the continuations")
        continuation = question.options[request.idx]
        if known.options.setdefault(request.idx, continuation) != continuation:
            raise FlipVQAError(f"{known.where}: two different options share request index {request.idx}")
        where.append((key, request.idx))
    order = {key: n for n, key in enumerate(questions)}
    for question in questions.values():
        _check_options(question)
    return list(questions.values()), [(order[key], idx) for key, idx in where]


def _choice_request(request: Any) -> tuple[tuple, ChoiceQuestion]:
    """A request's document key and a one-option question made of it."""
    args = tuple(request.args)
    if len(args) != 2 + len(DOC_ARGS):
        task = getattr(request, "task_name", "?")
        raise FlipVQAError(f"task {task}: a loglikelihood request without its document ({len(args)} arguments), as "
                           "acc_mutual_info sends for its unconditional half: flipvqa scores the options of a question "
                           "together; use metric acc instead")
    context, continuation, doc_to_visual, doc_id, task, split = args
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise FlipVQAError(f"task {task}, doc {doc_id}: the request's context and continuation are not both text "
                           "(output_type loglikelihood sends no options): flipvqa scores multiple_choice tasks")
    question = ChoiceQuestion(task, split, doc_id, context, doc_to_visual, {request.idx: continuation.strip()})
    return (task, split, doc_id), question


def _check_options(question: ChoiceQuestion) -> None:
    n = len(question.options)
    if not 2 <= n <= len(LETTERS):
        hint = " (output_type loglikelihood sends one: use multiple_choice)" if n == 1 else ""
        raise FlipVQAError(f"{question.where}: {n} options; flipvqa scores 2 to {len(LETTERS)} per question{hint}")
    if sorted(question.options) != list(range(n)):
        raise FlipVQAError(f"{question.where}: options {sorted(question.options)} arrived, not 0..{n - 1}: "
                           "the document's option set is incomplete")
    empty = next((k for k, option in question.options.items() if not option), None)
    if empty is not None:
        raise FlipVQAError(f"{question.where}: option {empty} is empty")
    if not question.context.strip():
        raise FlipVQAError(f"{question.where}: the question (the request's context) is empty")


@dataclass(frozen=True)
class GenerationSettings:
    """How a ``generate_until`` request is answered."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    until: tuple[str, ...] = ()


def generation_settings(kwargs: Optional[dict], default_max_new_tokens: int, where: str) -> GenerationSettings:
    """A request's generation kwargs as settings: ``until`` (a string or a list), ``max_new_tokens``
    (else ``default_max_new_tokens``), ``temperature`` and ``top_p``; ``do_sample: false`` means
    greedy whatever the temperature, as in transformers. Beam search is refused."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    if not all(isinstance(u, str) for u in until):
        raise FlipVQAError(f"{where}: generation kwarg 'until' must be a string or a list of strings, got {until!r}")
    if int(kwargs.get("num_beams") or 1) > 1:
        raise FlipVQAError(f"{where}: num_beams {kwargs['num_beams']}: flipvqa answers greedily or by sampling, "
                           "not by beam search")
    max_new = kwargs.get("max_new_tokens")
    temperature = float(kwargs.get("temperature") or 0.0)
    if kwargs.get("do_sample") is False:
        temperature = 0.0
    try:
        max_new = default_max_new_tokens if max_new is None else int(max_new)
    except (TypeError, ValueError):
        raise FlipVQAError(f"{where}: generation kwarg max_new_tokens {max_new!r} is not a number") from None
    top_p = kwargs.get("top_p")
    return GenerationSettings(max_new, temperature, 1.0 if top_p is None else float(top_p),
                              tuple(u for u in until if u))


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the ``until`` strings. Cutting after generating is exact: later
    tokens never change earlier ones."""
    cut = min((text.find(u) for u in until if u in text), default=len(text))
    return text[:cut]
