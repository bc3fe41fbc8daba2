"""The inner loops: one training step, one training epoch (resumable), scoring a split."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader

from .data.dataset import collate
from .devices import Dist
from .faults import crash_point
from .io import progress
from .errors import FlipVQAError
from .model.flipped import FlippedVQA
from .model.generate import Sampling, generate
from .model.inputs import Batch, TaskBatch
from .openended import exact_match
from .optim import lr_at

LOSS_KEYS = ("loss", "vqa_loss", "vaq_loss", "qav_loss")


class NonFinite(Exception):
    """A batch whose loss is not finite; ``bad`` names the losses that are not."""

    def __init__(self, values: list[float]):
        self.values = values
        self.bad = [k for k, v in zip(LOSS_KEYS[1:], values[1:]) if not math.isfinite(v)] or ["loss"]
        super().__init__(", ".join(self.bad))


class Stop(Exception):
    """Raised by a loop when its ``should_stop`` says so, at a point safe to resume from."""


def train_step(model: FlippedVQA, batch: Batch, *, amp, dist: Dist, accum_iter: int = 1, scaler=None) -> list[float]:
    """Forward and backward of one batch (the loss divided by ``accum_iter``); returns the
    batch's (loss, vqa, vaq, qav). A loss that is not finite on any rank raises
    :class:`NonFinite` on every rank before anything reaches the gradients."""
    with amp:
        vqa, vaq, qav = model(batch)
    loss = vqa + vaq + qav
    values = [t.item() for t in (loss, vqa, vaq, qav)]
    finite = math.isfinite(values[0])
    if dist.enabled:  # every rank must take the same path
        flag = torch.tensor([1.0 if finite else 0.0], device=loss.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
        finite = bool(flag.item())
    if not finite:
        raise NonFinite(values)
    loss = loss / accum_iter
    (scaler.scale(loss) if scaler else loss).backward()
    return values


def optimizer_step(model: FlippedVQA, optimizer: torch.optim.Optimizer, *, dist: Dist, scaler=None) -> float:
    """Average the gradients over ranks, step and zero them; returns the gradients' L2 norm."""
    params = [p for _, p in model.trainable_parameters()]
    if dist.enabled:
        _average_gradients(params, dist)
    if scaler:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item() \
        if grads else 0.0
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class EpochState:
    """Where an epoch is: ``step`` batches done, the log sums of those batches, the non-finite
    batches skipped. ``at_boundary`` is the same at the last optimizer step (what a stop saves)."""

    epoch: int
    n_batches: int
    step: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("lr", *LOSS_KEYS), 0.0))
    skipped: int = 0
    at_boundary: tuple = ()

    def mark_boundary(self) -> None:
        self.at_boundary = (self.step, dict(self.sums), self.skipped)


@dataclass
class Hooks:
    """What the epoch loop tells its caller: ``on_update(state, metrics)`` after every optimizer
    step; ``should_stop()`` is asked after every batch; ``on_nonfinite(state, error, batch)``
    decides whether a non-finite batch is skipped (returns True) or stops the run (raises)."""

    on_update: Callable[[EpochState, dict], None] = lambda state, metrics: None
    should_stop: Callable[[], bool] = lambda: False
    on_nonfinite: Optional[Callable] = None


def train_one_epoch(model: FlippedVQA, loader: Iterable, optimizer: torch.optim.Optimizer, state: EpochState,
                    args, device: torch.device, amp, dist: Dist, scaler=None, hooks: Hooks = Hooks()
                    ) -> dict[str, float]:
    """The rest of an epoch from ``state.step`` (``loader`` yields its remaining batches);
    returns the means over its batches (the reference's ``train_*`` values).

    The lr is set from the fractional epoch at the first batch of every accumulation; gradients
    are zeroed at the start, so an epoch's leftover micro-batches are dropped, as the reference
    does (docs/faithfulness.md, "Training schedule and log"). Raises :class:`Stop` when
    ``hooks.should_stop()``: ``state.at_boundary`` is then the point to resume from."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    state.mark_boundary()
    bar = progress(loader, f"epoch {state.epoch}", enabled=dist.is_main, initial=state.step, total=state.n_batches)
    started, accumulated = time.perf_counter(), []
    for batch in bar:
        step = state.step
        if step % args.accum_iter == 0:
            lr = lr_at(state.epoch + step / state.n_batches, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
        try:
            values = train_step(model, batch.to(device), amp=amp, dist=dist, accum_iter=args.accum_iter, scaler=scaler)
        except NonFinite as error:
            if hooks.on_nonfinite is None:
                raise
            hooks.on_nonfinite(state, error, batch)  # raises unless the batch is to be skipped
            values = None
            state.skipped += 1
        crash_point("micro_batch")
        if values is not None:
            accumulated.append(values)
            for key, value in zip(LOSS_KEYS, values):
                state.sums[key] += value
            state.sums["lr"] += optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        state.step += 1
        if state.step % args.accum_iter == 0:
            metrics = None
            if accumulated:  # an accumulation whose every batch was skipped is no step
                norm = optimizer_step(model, optimizer, dist=dist, scaler=scaler)
                means = [sum(col) / len(accumulated) for col in zip(*accumulated)]
                metrics = {"lr": optimizer.param_groups[0]["lr"], **dict(zip(LOSS_KEYS, means)), "grad_norm": norm,
                           "seconds": time.perf_counter() - started}
            state.mark_boundary()
            if metrics is not None:
                hooks.on_update(state, metrics)
            started, accumulated = time.perf_counter(), []
        if hooks.should_stop():
            raise Stop
    state.mark_boundary()  # the whole epoch is trained: a stop during validation resumes there
    return epoch_means(state, device, dist)


def epoch_means(state: EpochState, device: torch.device, dist: Dist) -> dict[str, float]:
    """The epoch's log values: means over its batches (skipped ones left out), averaged over
    ranks as the reference does."""
    counted = max(state.n_batches - state.skipped, 1)
    means = {k: v / counted for k, v in state.sums.items()}
    if dist.enabled:
        t = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
        torch_dist.all_reduce(t)
        means = dict(zip(means, (t / dist.world_size).tolist()))
    return means


def _average_gradients(params: list[torch.Tensor], dist: Dist) -> None:
    for p in params:
        if p.grad is None:  # every rank must join every all-reduce
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad)
        p.grad /= dist.world_size


@dataclass(frozen=True)
class Answering:
    """How open-ended questions are answered: the generation settings and the tokenizer's
    ``decode``."""

    sampling: Sampling
    decode: Callable[[list[int]], str]


def answering(args, tokenizer) -> Answering:
    """The run's generation settings (--max_new_tokens, --temperature, --top_p, --seed)."""
    sampling = Sampling(args.max_new_tokens, tuple(dict.fromkeys(tokenizer.stop_ids)),
                        getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0), args.seed)
    return Answering(sampling, tokenizer.decode)


@torch.no_grad()
def score_split(model: FlippedVQA, loader: DataLoader, device: torch.device, amp, dist: Dist,
                desc: str = "eval", should_stop: Callable[[], bool] = lambda: False,
                lockstep: bool = False, answering: Optional[Answering] = None) -> list[dict]:
    """One prediction row per question of the loader (multiple-choice: every option scored;
    open-ended: the answer generated with ``answering``), gathered on every rank and sorted by
    the question's index (each question exactly once, also under torchrun).

    ``lockstep`` (a sharded backbone, whose every call is collective): a rank with fewer batches
    than another answers a stand-in batch for each missing one and drops its rows."""
    model.eval()
    rows = []
    missing = _batches_behind(len(loader), dist, device) if lockstep and dist.enabled else 0
    batch = None
    for batch in progress(loader, desc, enabled=dist.is_main):
        rows += answer_batch(model, batch.to(device), amp, answering, lockstep)
        crash_point("validation")
        if should_stop():
            raise Stop
    if missing:
        stand_in = batch if batch is not None else loader.collate_fn([loader.dataset.dataset[0]])
        for _ in range(missing):
            answer_batch(model, stand_in.to(device), amp, answering, lockstep)
    if dist.enabled:
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: r["index"])


def answer_batch(model: FlippedVQA, batch: Batch, amp, answering: Optional[Answering],
                 lockstep: bool = False) -> list[dict]:
    """The prediction rows of one evaluation batch. Under ``lockstep`` every rank runs the
    scoring and the generation when any rank has such questions (a rank without them runs a
    stand-in and drops it)."""
    has = {task: task in batch.tasks for task in ("vqa", "prompt")}
    run = {task: not model.agree(not flag) for task, flag in has.items()} if lockstep else has
    rows = []
    if run["vqa"]:
        part = batch.part("vqa") if has["vqa"] else _options_stand_in(batch)
        with amp:
            scores = model.score_options(part).float().cpu()
        if has["vqa"]:
            rows += [choice_row(rec, s) for rec, s in zip(part.records, scores)]
    if run["prompt"]:
        if answering is None:
            raise FlipVQAError("open-ended questions need generation settings (loops.Answering)")
        part = batch.part("prompt") if has["prompt"] else _prompt_stand_in(batch)
        with amp:
            out = generate(model, part.video, part.tasks["prompt"], answering.sampling)
        if has["prompt"]:
            rows += [open_row(rec, answering.decode(tokens).strip(), stopped)
                     for rec, tokens, stopped in zip(part.records, out.tokens, out.stopped)]
    return rows


def choice_row(rec, scores: torch.Tensor) -> dict:
    scores = scores[:len(rec.options)]  # a question with fewer options than the batch's most
    return {"index": rec.index, "qid": rec.qid, "vid": rec.vid, "answer": rec.answer,
            "prediction": int(scores.argmin()), "scores": scores.tolist(), "qtype": rec.qtype}


def open_row(rec, prediction: str, stopped: bool) -> dict:
    """An open-ended question's row: ``answer`` is the list of acceptable answers (None in a
    split without answers), ``cut`` whether --max_new_tokens ended the answer."""
    correct = None if rec.answers is None else exact_match(prediction, rec.answers)
    return {"index": rec.index, "qid": rec.qid, "vid": rec.vid, "answer": rec.answers, "prediction": prediction,
            "correct": correct, "cut": not stopped, "qtype": rec.qtype}


def _options_stand_in(batch: Batch) -> Batch:
    """A one-option question made of the first prompt (scored and dropped)."""
    tb = batch.tasks["prompt"]
    n = int(tb.length[0])
    ids = torch.cat([tb.ids[:1, :n], tb.ids[:1, n - 1:n]], dim=1)
    one = TaskBatch(ids, tb.length[:1], tb.length[:1] + 1, tb.video_start[:1])
    return Batch(batch.part("prompt").video[:1], {"vqa": one}, batch.answer[:1], batch.qtype[:1])


def _prompt_stand_in(batch: Batch) -> Batch:
    """A generation prompt made of the first option sequence up to its targets (answered and
    dropped)."""
    tb = batch.tasks["vqa"]
    n = int(tb.label_start[0])
    one = TaskBatch(tb.ids[:1, :n], tb.label_start[:1], tb.label_start[:1], tb.video_start[:1])
    return Batch(batch.part("vqa").video[:1], {"prompt": one}, batch.answer[:1], batch.qtype[:1])


def _batches_behind(n_batches: int, dist: Dist, device: torch.device) -> int:
    """How many batches fewer than the busiest rank this rank has."""
    t = torch.tensor([n_batches], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item()) - n_batches


def eval_loader(dataset, batch_size: int, num_workers: int, dist: Dist, pad_to: Optional[int] = None) -> DataLoader:
    """Questions split across ranks without padding, so that each is scored exactly once."""
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=functools.partial(collate, pad_to=pad_to))
