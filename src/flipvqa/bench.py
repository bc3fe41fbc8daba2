"""``flipvqa bench``: training and evaluation throughput, peak memory and useful FLOP/s.

One run measures one mode and prints one JSON line on stdout (logs go to stderr):

* fast (default): dynamic padding, vocabulary logits only at target positions, the options of a
  question scored with their common prefix run once;
* ``--naive``: what the authors' code computes: every sequence padded to ``--max_seq_len``, logits
  at every position, one full sequence per option.

``--compare`` runs both, each in its own child process (so that peak memory is measured
separately), and prints one line with both results and the ratios ``train_speedup``,
``eval_speedup`` (fast / naive throughput) and ``memory_ratio`` (fast / naive peak memory).

A training step is forward + backward + AdamW step on the enabled objectives (``--vaq --qav`` for
the paper's three); an evaluation batch is ``score_options`` on ``--batch_size`` questions. Both
phases run ``--warmup`` untimed steps first. Batches are collated (and moved to the device) before
the clock starts, so the figures are the model's, not the data loader's.

Useful FLOPs (``model_tflops_per_s``, training; the same count in both modes, so padding and
logits nobody needs are not credited). Per non-padding token of every enabled task sequence::

    forward = 2 * P                      # P: weights of the matmuls in the layers that run
            + 2 * 2 * L * d * ctx        # attention scores and values; ctx: causal context,
                                         #   summed over a sequence of n tokens: n (n + 1) / 2
    plus 2 * d * V per target token      # vocabulary projection, only where a target is (VQA, VAQ)
    training step = 2 * forward          # the backbone is frozen: backward needs input gradients
                                         #   only, about one more forward (no weight gradients)

with L layers, d = heads * head_dim, V the vocabulary. The adaption prompts (``adapter_len`` keys
per layer), the visual projection and the QAV frame classifier are left out (about 1%).
On CPU, ``fraction_of_matmul_peak`` divides the achieved FLOP/s by the float32 FLOP/s of a
2048 x 2048 matmul measured in the same run; on CUDA, ``mfu`` divides it by the GPU's dense
bf16 peak (known cards only).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` (weights included); on CPU the
peak resident set size above the one measured right after the model and the batches are built
(Linux ``VmHWM``, reset per phase through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import data
from .config import RunConfig, add_run_arguments, resolve
from .data.dataset import Batch, Item, VQADataset, collate
from .data.records import FEATURE_DIM, Record
from .errors import FlipVQAError
from .model.flipped import FlippedVQA
from .model.llama import PRESETS, Transformer, rope_frequencies
from .prompts import normalize_question
from .runtime import (
    DTYPES,
    autocast,
    build_dataset,
    build_model,
    init_distributed,
    seed_everything,
    wrap_backbone,
)
from .tokenizer import Tokenizer, load_tokenizer
from .train import make_optimizer

log = logging.getLogger(__name__)

DEFAULT_SYNTHETIC = 256
# Dense bf16 peak TFLOP/s by device name (first match wins).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
_WH = ("why", "what", "how", "where", "when", "who")
_WORDS = ("the man woman boy girl baby dog cat ball chair table door car bike hand head water food "
          "toy box bag phone book cup window floor grass tree house room video people lady kid "
          "play pick hold look walk run sit stand open close throw push pull eat drink watch move "
          "turn start end after before while again first last left right up down near beside big "
          "small red white black blue green happy slowly quickly together around at on in with "
          "from into out of to some two three").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per phase first (default: 2)")
    parser.add_argument("--naive", action="store_true",
                        help="compute as the reference: pad to max_seq_len, all logits, one full sequence per option")
    parser.add_argument("--compare", action="store_true",
                        help="run fast and naive mode, each in its own process; print both and their ratios")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help=f"use N synthetic NExT-QA-style questions (default: {DEFAULT_SYNTHETIC} "
                             f"when --data_path/<dataset> does not exist)")


def run(ns: argparse.Namespace) -> int:
    if ns.steps < 1 or ns.warmup < 0:
        raise FlipVQAError("--steps must be >= 1 and --warmup >= 0")
    if ns.synthetic is not None and ns.synthetic < 1:
        raise FlipVQAError(f"--synthetic must be at least 1 (got {ns.synthetic})")
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
    tokens = sum(_count(b, tasks)[0] for b in timed)
    flops = sum(train_flops(model, b, tasks) for b in timed)
    achieved = flops / train_s
    shape = model.backbone.args
    result = {
        "config": {
            "mode": "naive" if naive else "fast", "device": str(device), "device_name": device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": args.model, "backbone": backbone_source, "dim": shape.dim, "n_layers": shape.n_layers,
            "n_heads": shape.n_heads, "vocab_size": shape.vocab_size, "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len, "objectives": list(tasks), "data": data_source,
            "steps": ns.steps, "warmup": ns.warmup, "seed": args.seed,
            "load_average_at_start": load_at_start,  # other processes on the machine skew the figures
        },
        "train_samples_per_s": len(timed) * args.batch_size / train_s,
        "eval_questions_per_s": sum(len(b.records) for b in eval_batches[ns.warmup:]) / eval_s,
        "tokens_per_s": tokens / train_s,
        "model_tflops_per_s": achieved / 1e12,
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
    for batch in batches[:warmup]:
        step(batch)
    _sync(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    _sync(device)
    return time.perf_counter() - start, memory.peak_mb()


def train_step_fn(model: FlippedVQA, args: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype) -> Callable[[Batch], None]:
    """One optimisation step as ``flipvqa train`` does it (no gradient accumulation)."""
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    optimizer = make_optimizer(model, args.weight_decay, lr)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None
    amp = autocast(device, dtype)

    def step(batch: Batch) -> None:
        model.train()
        with amp:
            vqa, vaq, qav = model(batch)
        loss = vqa + vaq + qav
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    """A named shape of :data:`PRESETS` with random weights (when no such folder exists under
    ``--llama_model_path``), else the backbone folder through :func:`build_model`.
    Returns the model, the tokenizer and where the backbone came from."""
    if args.model not in PRESETS or (Path(args.llama_model_path) / args.model).is_dir():
        model, tokenizer = build_model(args, device)
        return model, tokenizer, str(Path(args.llama_model_path) / args.model)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if args.dtype:
        dtype = DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backbone = random_backbone(args.model, tokenizer.n_words, device, dtype, args.seed)
    model = wrap_backbone(backbone, args, device)
    return model, tokenizer, "random weights"


def random_backbone(name: str, vocab_size: int, device: torch.device, dtype: torch.dtype,
                    seed: int) -> Transformer:
    """``Transformer(PRESETS[name])`` with ``vocab_size`` words, initialised (seeded) directly on
    ``device`` in ``dtype`` (a 7B model never exists in float32)."""
    shape = dataclasses.replace(PRESETS[name], vocab_size=vocab_size)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(shape)
    finally:
        torch.set_default_dtype(default)
    model.inv_freq = rope_frequencies(shape).to(device)
    return model


def bench_datasets(args: argparse.Namespace, tokenizer: Tokenizer,
                   synthetic: Optional[int]) -> tuple[VQADataset, VQADataset, str]:
    """(training set, evaluation set, description): the train and ``--split`` splits of
    ``--data_path/<dataset>``, or synthetic questions when asked for or when that folder is missing."""
    root = Path(args.data_path) / args.dataset
    if synthetic is None and root.is_dir():
        return (build_dataset(args, tokenizer, "train", train=True),
                build_dataset(args, tokenizer, args.split, train=False), str(root))
    n = synthetic or DEFAULT_SYNTHETIC
    if synthetic is None:
        log.info("%s not found: using %d synthetic questions", root, n)
    n_options = data.n_options(args.dataset)
    records = synthetic_records(n, args.seed, n_options)

    def make(train: bool) -> VQADataset:
        return VQADataset(records, tokenizer, n_options, args.max_feats, args.max_seq_len, args.sub,
                          train=train, tasks=_objectives(args) if train else ("vqa",), name="synthetic")

    return make(True), make(False), f"synthetic {n}"


def synthetic_records(n: int, seed: int, n_options: int = 5) -> list[Record]:
    """``n`` NExT-QA-style questions (8-12 words, a wh-word first), ``n_options`` options of 2-5
    words and 10-20 frames of float16 features ``N(0, 1) * 0.5``; a function of ``seed``."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    records = []
    for i in range(n):
        question = normalize_question(f"{rng.choice(_WH)} {words(rng.randint(7, 11))}")
        options = [words(rng.randint(2, 5)) for _ in range(n_options)]
        frames = (torch.randn(rng.randint(10, 20), FEATURE_DIM, generator=gen) * 0.5).half()
        records.append(Record(index=i, vid=f"synthetic{i:05d}", question=question, options=options,
                              answer=rng.randrange(n_options), qtype=rng.randint(1, 8), frames=frames))
    return records


def batch_items(dataset: VQADataset, batch_size: int, n_batches: int,
                shuffle_seed: Optional[int]) -> list[list[Item]]:
    """``n_batches`` batches going round the dataset (shuffled once when a seed is given)."""
    order = list(range(len(dataset)))
    if shuffle_seed is not None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    flat = [order[k % len(order)] for k in range(batch_size * n_batches)]
    return [[dataset[i] for i in flat[b * batch_size:(b + 1) * batch_size]] for b in range(n_batches)]


# ---------------------------------------------------------------------------- counting
def _objectives(args: argparse.Namespace) -> tuple[str, ...]:
    return ("vqa",) + (("vaq",) if args.vaq else ()) + (("qav",) if args.qav else ())


def _count(batch: Batch, tasks: tuple[str, ...]) -> tuple[int, int, int]:
    """(non-padding tokens, summed causal context n (n + 1) / 2, vocabulary targets) of ``tasks``."""
    tokens = context = targets = 0
    for task in tasks:
        tb = batch.tasks[task]
        n = tb.length.long()
        tokens += int(n.sum())
        context += int((n * (n + 1) // 2).sum())
        if task != "qav":  # QAV classifies frames; it never reaches the vocabulary
            targets += int((n - tb.label_start.clamp(min=1)).clamp(min=0).sum())
    return tokens, context, targets


def train_flops(model: FlippedVQA, batch: Batch, tasks: tuple[str, ...]) -> float:
    """Useful FLOPs of one training step on ``batch`` (the formula of the module docstring)."""
    shape = model.backbone.args
    layers = list(model.backbone.layers)
    if model.cfg.skip_unadapted_layers:
        layers = layers[len(layers) - model.cfg.adapter_layer:]
    matmul_params = sum(p.numel() for layer in layers for p in layer.parameters() if p.ndim == 2)
    tokens, context, targets = _count(batch, tasks)
    forward = (2 * matmul_params * tokens + 4 * len(layers) * shape.n_heads * shape.head_dim * context
               + 2 * shape.dim * shape.vocab_size * targets)
    return 2.0 * forward


# ---------------------------------------------------------------------------- machine
class PeakMemory:
    """Peak memory of a phase, in MB: CUDA ``max_memory_allocated``, or on CPU the peak RSS above
    the RSS at construction (the baseline)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.note = "torch.cuda.max_memory_allocated: peak allocated CUDA memory, weights and batches included"
            return
        self.baseline_kb = _proc_status("VmRSS")
        self.resettable = self.baseline_kb is not None and _reset_rss_peak()
        if self.resettable:
            self.note = ("CPU: peak resident set size (VmHWM, reset per phase) minus the RSS right after "
                         "the model and the batches were built")
        else:
            import resource

            self.baseline_kb = self.baseline_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.note = ("CPU: the process's peak resident set size since it started (ru_maxrss) minus the "
                         "RSS right after the model and the batches were built; 0 if the build peaked higher")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_rss_peak()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            peak_kb = _proc_status("VmHWM") or 0
        else:
            import resource

            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kb - self.baseline_kb, 0) / 1024


def _proc_status(key: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best float32 GFLOP/s of an ``n x n`` matmul on the CPU, with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        found = None
    import platform

    return found.group(1).strip() if found else (platform.processor() or "cpu")


def gpu_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU, by name; None on CPU or for other cards."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- --compare
def compare(ns: argparse.Namespace) -> dict:
    """Fast then naive mode, each in a child ``python -m flipvqa bench`` process."""
    argv = child_argv(ns)
    fast = _child(argv, "fast")
    naive = _child(argv + ["--naive"], "naive")

    def ratio(key: str) -> Optional[float]:
        return fast[key] / naive[key] if naive[key] else None

    return {"fast": fast, "naive": naive, "train_speedup": ratio("train_samples_per_s"),
            "eval_speedup": ratio("eval_questions_per_s"), "memory_ratio": ratio("peak_memory_mb")}


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
