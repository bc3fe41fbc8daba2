"""The lmms-eval model class of flipvqa (registered as ``flipvqa``; see :mod:`flipvqa.lmms`).

Everything a question goes through is :class:`flipvqa.ask.Answerer`'s, the library behind
``flipvqa ask``: the checkpoint and its stored model options (as ``flipvqa eval`` loads them), the
prompts, the batched option scoring and the cached generation. This class only turns lmms-eval's
requests into Answerer questions and the answers back into what lmms-eval expects.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from ..ask import OPTIONS, Answerer, Question
from ..errors import FlipVQAError
from ..io import progress
from .requests import DOC_ARGS, GenerationSettings, cut_at, generation_settings, group_options
from .videos import Videos

log = logging.getLogger(__name__)

T = TypeVar("T")
# model_args that name files or a backbone: lmms-eval turns "13" into 13, flipvqa wants text.
TEXT_ARGS = ("checkpoint", "clip_model", "features", "model", "llama_model_path", "tokenizer_path", "dtype", "device")
KNOWN_ARGS = ("checkpoint", "clip_model", "features", "device", "batch_size", "max_new_tokens", "fps", "seed",
              *OPTIONS)


def _one_line(method: Callable) -> Callable:
    """lmms-eval prints the traceback of whatever a model raises and then exits with status 0. A
    FlipVQAError (bad input) ends the run as the flipvqa command line does instead: one line on
    stderr and exit status 2 (SystemExit is not an Exception, so lmms-eval lets it through)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except FlipVQAError as err:
            print(f"flipvqa: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


class FlipVQA(lmms):
    """A Flipped-VQA checkpoint answering lmms-eval's multiple-choice and generation tasks."""

    is_simple = True

    @_one_line
    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        model_args.pop("max_batch_size", None)  # lmms-eval's automatic batch sizing: not used
        args = _checked_args(model_args)
        options = {k: args[k] for k in OPTIONS if k in args}
        self.batch_size_per_gpu = args.get("batch_size", 1)
        self.max_new_tokens, self.seed = args.get("max_new_tokens", 32), args.get("seed", 0)
        self.answerer = Answerer(args["checkpoint"], clip_model=args.get("clip_model"), fps=args.get("fps", 1),
                                 device=args.get("device"), **options)
        self.videos = Videos(self.answerer, args.get("features"))

    @classmethod
    @_one_line
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "FlipVQA":
        """``--model_args`` win over the command line's ``--batch_size``/``--device``: lmms-eval
        always passes its default ``--batch_size 1``, which would otherwise clash with
        ``batch_size=`` in the model args."""
        from lmms_eval import utils

        try:
            args = utils.simple_parse_args_string(arg_string)
        except ValueError:
            raise FlipVQAError(f"--model_args {arg_string!r}: expected key=value pairs separated by commas") from None
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------ multiple choice

    @_one_line
    def loglikelihood(self, requests: list) -> list[GenerationResult]:
        """Each option's mean cross-entropy (lmms-eval takes the lowest) and whether it is the
        model's pick. Wrapped in ``GenerationResult``: lmms-eval 0.7.3 turns a bare
        ``(float, bool)`` into a string (tests/test_lmms.py guards this)."""
        questions, where = group_options(requests)
        scores: list[list[float]] = []
        for batch in progress(_chunks(questions, self.batch_size_per_gpu), "flipvqa options",
                              total=-(-len(questions) // self.batch_size_per_gpu)):
            asked = [Question(self._video(q.doc_to_visual, q.task, q.split, q.doc_id), q.context, q.option_list())
                     for q in batch]
            answers = self._named(self.answerer.ask_many, asked, [q.where for q in batch])
            scores += [answer.scores for answer in answers]
        return [GenerationResult(text=(scores[q][k], k == scores[q].index(min(scores[q])))) for q, k in where]

    # ------------------------------------------------------------------ answers in words

    @_one_line
    def generate_until(self, requests: list) -> list[GenerationResult]:
        """Each context answered in words as an open-ended question, cut at the first ``until``
        string; requests with the same settings share batches."""
        jobs = [self._generation_job(request) for request in requests]
        results: list[Optional[GenerationResult]] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for n, (settings, _, _) in enumerate(jobs):
            groups.setdefault((settings.max_new_tokens, settings.temperature, settings.top_p), []).append(n)
        bar = progress(total=len(jobs), desc="flipvqa answers")
        for (max_new, temperature, top_p), members in groups.items():
            for chunk in _chunks(members, self.batch_size_per_gpu):
                generate = lambda qs: self.answerer.generate_many(  # noqa: E731
                    qs, max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=self.seed)
                answers = self._named(generate, [jobs[n][1] for n in chunk], [jobs[n][2] for n in chunk])
                for n, answer in zip(chunk, answers):
                    text = cut_at(answer.answer, jobs[n][0].until).strip()
                    results[n] = GenerationResult(text=text, token_counts=TokenCounts(output_tokens=len(answer.tokens)))
                bar.update(len(chunk))
        bar.close()
        return results

    @_one_line
    def generate_until_multi_round(self, requests: list) -> list:
        raise FlipVQAError("flipvqa answers one question per video in one round: generate_until_multi_round is not "
                           "supported; use a multiple_choice or generate_until task")

    # ------------------------------------------------------------------ helpers

    def _generation_job(self, request: Any) -> tuple[GenerationSettings, Question, str]:
        args = tuple(request.args)
        if len(args) != 2 + len(DOC_ARGS):
            raise FlipVQAError(f"task {request.task_name}: a generate_until request without its document "
                               f"({len(args)} arguments)")
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        where = f"task {task}, doc {doc_id}"
        settings = generation_settings(gen_kwargs, self.max_new_tokens, where)
        return settings, Question(self._video(doc_to_visual, task, split, doc_id), context), where

    def _video(self, doc_to_visual: Optional[Callable], task: str, split: str, doc_id: Any):
        """The features of a document's video (lmms-eval hands the documents over as ``task_dict``)."""
        where = f"task {task}, doc {doc_id}"
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise FlipVQAError(f"{where}: the document is not in the task_dict lmms-eval hands over") from None
        return self.videos.of_doc(doc_to_visual, doc, where)

    @staticmethod
    def _named(call: Callable[[list], list[T]], asked: list, wheres: Sequence[str]) -> list[T]:
        """``call(asked)``; a question the Answerer refuses (too long, empty) is named by its
        document: the batch is retried one question at a time up to the one that fails."""
        try:
            return call(asked)
        except FlipVQAError as err:
            if len(asked) == 1:
                raise FlipVQAError(f"{wheres[0]}: {err}") from None
            for one, where in zip(asked, wheres):
                FlipVQA._named(call, [one], [where])
            raise


def _checked_args(model_args: dict) -> dict:
    """The model args, checked: one line naming a wrong one."""
    unknown = sorted(set(model_args) - set(KNOWN_ARGS))
    if unknown:
        raise FlipVQAError(f"model_args: unknown {', '.join(unknown)} (known: {', '.join(KNOWN_ARGS)})")
    args = {k: (str(v) if k in TEXT_ARGS and v is not None else v) for k, v in model_args.items()}
    if not args.get("checkpoint"):
        raise FlipVQAError("model_args: checkpoint= is required (a flipvqa or the authors' Flipped-VQA checkpoint)")
    if not Path(args["checkpoint"]).is_file():
        raise FlipVQAError(f"model_args: checkpoint={args['checkpoint']}: file not found")
    for name, low in (("batch_size", 1), ("max_new_tokens", 1), ("seed", 0)):
        if name in args:
            args[name] = _integer(name, args[name], low)
    if "fps" in args and not (isinstance(args["fps"], (int, float)) and args["fps"] > 0):
        raise FlipVQAError(f"model_args: fps={args['fps']} must be a positive number")
    return args


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < low:
        raise FlipVQAError(f"model_args: {name}={value} must be an integer of at least {low}")
    return int(value)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
