"""``flipvqa bench``: training and evaluation throughput, peak memory and useful FLOP/s.

One run measures one mode and prints one JSON line on stdout (logs go to stderr):

* fast (default): dynamic padding, vocabulary logits only at target positions, the options of a
  question scored with their common prefix run once;
* ``--naive``: what the authors' code computes: every sequence padded to ``--max_seq_len``, logits
  at every position, one full sequence per option.

``--compare`` runs both, each in its own child process (so that peak memory is measured
separately), and prints one line with both results and the ratios ``train_speedup``,
``eval_speedup`` (fast / naive throughput) and ``memory_ratio`` (fast / naive peak memory).
``--repeat R`` runs R such rounds and takes each rate's best over its mode's rounds (the machine's
other load only ever slows a run down); ``rounds`` lists every round's rates.

A training step is forward + backward + AdamW step on the enabled objectives (``--vaq --qav`` for
the paper's three); an evaluation batch is ``score_options`` on ``--batch_size`` questions. Both
phases run ``--warmup`` untimed steps first. Batches are collated (and moved to the device) before
the clock starts, so the figures are the model's, not the data loader's.

Useful FLOPs (``model_tflops_per_s``, training) are counted by :mod:`flipvqa.bench.flops`.
On CPU, ``fraction_of_matmul_peak`` divides the achieved FLOP/s by the float32 FLOP/s of a
2048 x 2048 matmul measured in the same run; on CUDA, ``mfu`` divides it by the GPU's dense
bf16 peak (known cards only).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` (weights included); on CPU the
peak resident set size above the one measured right after the model and the batches are built
(Linux ``VmHWM``, reset per phase through ``/proc/self/clear_refs``). ``backbone_weights_mb``
is what the backbone's weights occupy as stored (smaller under ``--quantize``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import data
from ..checkpoints import build_model, random_backbone, run_tokenizer, wrap_backbone
from ..config import RunConfig, add_run_arguments, resolve
from ..data.dataset import Item, VQADataset, collate
from ..demo.synthetic import random_records
from ..devices import DTYPES, Dist, autocast, init_distributed, seed_everything
from ..errors import FlipVQAError
from ..loops import optimizer_step, train_step
from ..model.flipped import FlippedVQA
from ..model.inputs import Batch
from ..model.llama import SHAPES
from ..optim import base_lr, make_optimizer
from ..quantize import quantize_backbone, weight_bytes
from ..tokenizer import Tokenizer
from .flops import count_tokens, train_flops
from .machine import PeakMemory, device_name, gpu_peak_tflops, matmul_peak_gflops, timed

log = logging.getLogger(__name__)

DEFAULT_SYNTHETIC = 256
# Dense bf16 peak TFLOP/s by device name (first match wins).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "bench")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per phase first (default: 2)")
    parser.add_argument("--naive", action="store_true",
                        help="compute as the reference: pad to max_seq_len, all logits, one full sequence per option")
    parser.add_argument("--compare", action="store_true",
                        help="run fast and naive mode, each in its own process; print both and their ratios")
    parser.add_argument("--repeat", type=int, default=1, metavar="R",
                        help="with --compare: R rounds of fast then naive; each figure is the best of its "
                             "mode's rounds (default: 1)")
    parser.add_argument("--generate", action="store_true",
                        help="measure answers in words instead: generated tokens/s cached, recomputing every "
                             "step, and transformers' generate (flipvqa.bench.generate)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help=f"use N synthetic NExT-QA-style questions (default: {DEFAULT_SYNTHETIC} "
                             f"when --data_path/<dataset> does not exist)")


def run(ns: argparse.Namespace) -> int:
    if ns.steps < 1 or ns.warmup < 0:
        raise FlipVQAError("--steps must be >= 1 and --warmup >= 0")
    if ns.repeat < 1:
        raise FlipVQAError(f"--repeat must be at least 1 (got {ns.repeat})")
    if ns.synthetic is not None and ns.synthetic < 1:
        raise FlipVQAError(f"--synthetic must be at least 1 (got {ns.synthetic})")
    if ns.generate and ns.compare:
        raise FlipVQAError("--generate measures its three ways in one run: leave out --compare")
    if ns.generate:
        from .generate import generate_bench

        result = generate_bench(ns, bench_model)
    else:
        result = compare(ns) if ns.compare else bench(ns)
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------- one mode
def bench(ns: argparse.Namespace) -> dict:
    """Measure one mode (``ns.naive``); returns the JSON-ready result."""
    args = resolve(ns)
    naive = bool(ns.naive)
    _, device = init_distributed(args.device)
    seed_everything(args.seed)
    model, tokenizer, backbone_source = bench_model(args, device)
    model.naive = naive
    if not (args.vaq and args.qav):
        log.warning("training measures %s only; pass --vaq --qav for the paper's three objectives",
                    "+".join(_objectives(args)))
    train_set, eval_set, data_source = bench_datasets(args, tokenizer, ns.synthetic)
    pad_to = args.max_seq_len if naive else None
    n_batches = ns.warmup + ns.steps
    train_batches = [collate(items, pad_to).to(device)
                     for items in batch_items(train_set, args.batch_size, n_batches, shuffle_seed=args.seed)]
    eval_batches = [collate(items, pad_to).to(device)
                    for items in batch_items(eval_set, args.batch_size, n_batches, shuffle_seed=None)]
    matmul_gflops = matmul_peak_gflops() if device.type == "cpu" else None
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    memory = PeakMemory(device)  # the baseline: model, data and batches are built
    dtype = model.backbone.tok_embeddings.weight.dtype
    log.info("bench: %s mode, %s, %s, %d warm-up + %d timed steps per phase",
             "naive" if naive else "fast", device, str(dtype).replace("torch.", ""), ns.warmup, ns.steps)
    train_s, train_peak = _phase(train_step_fn(model, args, device, dtype), train_batches, ns.warmup, memory, device)
    eval_s, eval_peak = _phase(eval_step_fn(model, device, dtype), eval_batches, ns.warmup, memory, device)

    timed = train_batches[ns.warmup:]
    tasks = _objectives(args)
    tokens = sum(count_tokens(b, tasks)[0] for b in timed)
    flops = sum(train_flops(model, b, tasks) for b in timed)
    achieved = flops / train_s
    shape = model.backbone.args
    result = {
        "config": {
            "mode": "naive" if naive else "fast", "device": str(device), "device_name": device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": args.model, "backbone": backbone_source, "dim": shape.dim, "n_layers": shape.n_layers,
            "n_heads": shape.n_heads, "vocab_size": shape.vocab_size, "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len, "quantize": args.quantize, "objectives": list(tasks), "data": data_source,
            "steps": ns.steps, "warmup": ns.warmup, "seed": args.seed,
            "load_average_at_start": load_at_start,  # other processes on the machine skew the figures
        },
        "train_samples_per_s": len(timed) * args.batch_size / train_s,
        "eval_questions_per_s": sum(len(b.records) for b in eval_batches[ns.warmup:]) / eval_s,
        "tokens_per_s": tokens / train_s,
        "model_tflops_per_s": achieved / 1e12,
        "backbone_weights_mb": weight_bytes(model.backbone) / 2**20,  # as stored: quantized or not
        "peak_memory_mb": max(train_peak, eval_peak),
        "train_peak_memory_mb": train_peak,
        "eval_peak_memory_mb": eval_peak,
        "memory_note": memory.note,
    }
    if matmul_gflops is not None:
        result["matmul_peak_gflops"] = matmul_gflops
        result["fraction_of_matmul_peak"] = achieved / (matmul_gflops * 1e9)
    peak = gpu_peak_tflops(device)
    if peak is not None and dtype in (torch.bfloat16, torch.float16):
        result["mfu"] = achieved / (peak * 1e12)
        result["mfu_peak_tflops"] = peak
    return result


def _phase(step: Callable[[Batch], None], batches: list[Batch], warmup: int, memory: PeakMemory,
           device: torch.device) -> tuple[float, float]:
    """Run the warm-up batches, then time the rest; returns (seconds, peak memory in MB)."""
    gc.collect()
    memory.start()
    seconds = timed(step, batches, warmup, device)
    return seconds, memory.peak_mb()


def train_step_fn(model: FlippedVQA, args: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype) -> Callable[[Batch], None]:
    """One optimisation step: ``loops.train_step`` and ``loops.optimizer_step``, the functions
    ``flipvqa train`` calls, with no gradient accumulation."""
    lr = args.lr if args.lr is not None else base_lr(args.blr, args.batch_size, 1, 1)
    optimizer = make_optimizer(model, args.weight_decay, lr)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None
    amp, dist = autocast(device, dtype), Dist()

    def step(batch: Batch) -> None:
        model.train()
        train_step(model, batch, amp=amp, dist=dist, scaler=scaler)
        optimizer_step(model, optimizer, dist=dist, scaler=scaler)

    return step


def eval_step_fn(model: FlippedVQA, device: torch.device, dtype: torch.dtype) -> Callable[[Batch], None]:
    """Option scoring as ``flipvqa eval`` does it (scores copied to the CPU)."""
    amp = autocast(device, dtype)

    def step(batch: Batch) -> None:
        model.eval()
        with torch.no_grad(), amp:
            model.score_options(batch).float().cpu()

    return step


# ---------------------------------------------------------------------------- model and data
def bench_model(args: argparse.Namespace, device: torch.device) -> tuple[FlippedVQA, Tokenizer, str]:
    """A named shape of :data:`flipvqa.model.llama.SHAPES` with random weights (when no such
    folder exists under ``--llama_model_path``), else the backbone folder through
    :func:`flipvqa.checkpoints.build_model`. Returns the model, the tokenizer and where the
    backbone came from."""
    tokenizer = run_tokenizer(args)
    if args.model not in SHAPES or (Path(args.llama_model_path) / args.model).is_dir():
        return build_model(args, device, tokenizer), tokenizer, str(Path(args.llama_model_path) / args.model)
    if args.dtype:
        dtype = DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = random_backbone(SHAPES[args.model], tokenizer.n_words, device, dtype, args.seed)
    if args.quantize:
        quantize_backbone(backbone, args.quantize, device)
    return wrap_backbone(backbone, args, device), tokenizer, "random weights"


def bench_datasets(args: argparse.Namespace, tokenizer: Tokenizer,
                   synthetic: Optional[int]) -> tuple[VQADataset, VQADataset, str]:
    """(training set, evaluation set, description): the train and ``--split`` splits of
    ``--data_path/<dataset>``, or synthetic questions when asked for or when that folder is missing."""
    root = Path(args.data_path) / args.dataset
    if synthetic is None and root.is_dir():
        return (data.build_dataset(args, tokenizer, "train", train=True),
                data.build_dataset(args, tokenizer, args.split, train=False), str(root))
    n = synthetic or DEFAULT_SYNTHETIC
    if synthetic is None:
        log.info("%s not found: using %d synthetic questions", root, n)
    n_options = data.n_options(args.dataset)
    records = random_records(n, args.seed, n_options)

    def make(train: bool) -> VQADataset:
        return VQADataset(records, tokenizer, n_options, args.max_feats, args.max_seq_len, args.sub,
                          train=train, tasks=_objectives(args) if train else ("vqa",), name="synthetic")

    return make(True), make(False), f"synthetic {n}"


def option_scores(model: FlippedVQA, dataset: VQADataset, questions: int, batch_size: int,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Option scores (float32, on the CPU) of the first ``questions`` questions of ``dataset``, as
    the evaluation phase computes them; for comparing one model's modes (dtype, quantization)."""
    step_batches = batch_items(dataset, batch_size, -(-questions // batch_size), shuffle_seed=None)
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        scores = [model.score_options(collate(items).to(device)).float().cpu() for items in step_batches]
    return torch.cat(scores)[:questions]


def batch_items(dataset: VQADataset, batch_size: int, n_batches: int,
                shuffle_seed: Optional[int]) -> list[list[Item]]:
    """``n_batches`` batches going round the dataset (shuffled once when a seed is given)."""
    order = list(range(len(dataset)))
    if shuffle_seed is not None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    flat = [order[k % len(order)] for k in range(batch_size * n_batches)]
    return [[dataset[i] for i in flat[b * batch_size:(b + 1) * batch_size]] for b in range(n_batches)]


def _objectives(args: argparse.Namespace) -> tuple[str, ...]:
    return ("vqa",) + (("vaq",) if args.vaq else ()) + (("qav",) if args.qav else ())


# ---------------------------------------------------------------------------- --compare
def compare(ns: argparse.Namespace) -> dict:
    """Fast then naive mode, each in a child ``python -m flipvqa bench`` process; ``--repeat``
    rounds of both, each throughput the best of its mode's rounds."""
    argv = child_argv(ns)
    rounds = [(_child(argv, "fast"), _child(argv + ["--naive"], "naive")) for _ in range(ns.repeat)]
    fast, naive = (_best([r[i] for r in rounds]) for i in (0, 1))

    def ratio(key: str) -> Optional[float]:
        return fast[key] / naive[key] if naive[key] else None

    result = {"fast": fast, "naive": naive, "train_speedup": ratio("train_samples_per_s"),
              "eval_speedup": ratio("eval_questions_per_s"), "memory_ratio": ratio("peak_memory_mb")}
    if ns.repeat > 1:
        result["rounds"] = [{mode: {key: run[key] for key in BEST_OF if key in run}
                             for mode, run in zip(("fast", "naive"), pair)} for pair in rounds]
    return result


# The figures --repeat takes the best of (the rest, memory included, are the first round's: the
# same work each round). A round that other load on the machine slowed down does not count.
BEST_OF = ("train_samples_per_s", "eval_questions_per_s", "tokens_per_s", "model_tflops_per_s",
           "matmul_peak_gflops")


def _best(runs: list[dict]) -> dict:
    best = dict(runs[0])
    for key in BEST_OF:
        if key in best:
            best[key] = max(run[key] for run in runs)
    if "fraction_of_matmul_peak" in best:
        best["fraction_of_matmul_peak"] = best["model_tflops_per_s"] * 1e3 / best["matmul_peak_gflops"]
    if "mfu" in best:
        best["mfu"] = best["model_tflops_per_s"] / best["mfu_peak_tflops"]
    return best


def child_argv(ns: argparse.Namespace) -> list[str]:
    """The ``bench`` command line of ``ns`` without ``--compare``/``--naive``."""
    argv = ["bench"]
    for f in dataclasses.fields(RunConfig):
        value = getattr(ns, f.name, None)
        if value is None or value is False:
            continue
        argv += [f"--{f.name}"] if value is True else [f"--{f.name}", str(value)]
    argv += ["--steps", str(ns.steps), "--warmup", str(ns.warmup)]
    if ns.synthetic is not None:
        argv += ["--synthetic", str(ns.synthetic)]
    return argv


def _child(argv: list[str], mode: str) -> dict:
    log.info("bench --compare: %s mode in a child process", mode)
    proc = subprocess.run([sys.executable, "-m", "flipvqa", *argv], stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise FlipVQAError(f"bench --compare: the {mode} run failed (exit {proc.returncode}; see above)")
    return json.loads(lines[-1])
