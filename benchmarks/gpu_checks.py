"""Every GPU check in one run, one JSON line per check on stdout (benchmarks/gpu.sh runs this).

    bash benchmarks/gpu.sh             # on a CUDA machine: about 6-8 minutes on an H100/H200
    bash benchmarks/gpu.sh --dry-run   # the same checks on the CPU with tiny models (tests/test_gpu_checks.py)

The checks, in order:

* ``reference``: the five reference cases evaluated on the device in float32 with TF32 off; their
  option scores must match what the authors' code computed (1e-4) and the predictions be equal.
* ``bf16``: the benchmark model (bench-512, random weights) scored in float32, then with its
  backbone in bf16 under autocast: predictions agree on >= 95% of 64 questions, scores within 0.15.
* ``bench``: ``flipvqa bench --compare`` on the LLaMA-7B shape in bf16 (a dry run: float32), with
  NExT-QA prompts, batch 8, 128 tokens and the three objectives: training samples/s, evaluation
  questions/s, MFU and peak memory, fast and naive mode; once plain and once with ``--compile``.
* ``quantize``: peak memory and weight bytes of ``flipvqa bench`` on the 7B and 13B shapes with the
  backbone in bf16, ``--quantize int8`` and ``--quantize nf4``.

A check that fails prints ``"pass": false`` (or an ``"error"``) and the others still run; the exit
status is 1 when any failed. Logs and the children's stderr go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # a checkout, installed or not

import torch  # noqa: E402

from reference import CASES, REF, case_dir, case_flags, expected_val  # noqa: E402

TOKENIZER = str(REF / "llama" / "tokenizer.model")
# What each check runs on a GPU and in a dry run.
PLANS = {
    "gpu": dict(device="cuda", dtype="bf16", bf16_model="bench-512", bench_model="llama-7b", compile=True,
                quantized=("llama-7b", "llama-13b"), steps=10, warmup=2, quant_steps=3, synthetic=256),
    "dry-run": dict(device="cpu", dtype="fp32", bf16_model="bench-128", bench_model="bench-128", compile=False,
                    quantized=("bench-128",), steps=1, warmup=1, quant_steps=1, synthetic=16),
}
QUANTIZE_FIGURES = ("backbone_weights_mb", "peak_memory_mb", "train_samples_per_s", "eval_questions_per_s")
BENCH_FLAGS = ["--tokenizer_path", TOKENIZER, "--vaq", "--qav", "--batch_size", "8", "--max_seq_len", "128"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run every check on the CPU with tiny models")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    ns = parser.parse_args()
    plan = PLANS["dry-run" if ns.dry_run else "gpu"]
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu.sh: no CUDA device here; --dry-run runs the checks on the CPU", file=sys.stderr)
        return 2
    failed = False
    for name in ns.only or CHECKS:
        start = time.perf_counter()
        try:
            line = CHECKS[name](plan)
        except Exception as exc:  # noqa: BLE001 - one check's failure must not hide the others
            line = {"pass": False, "error": f"{type(exc).__name__}: {exc}"}
        line = {"check": name, **line, "seconds": round(time.perf_counter() - start, 1)}
        failed |= line.get("pass") is False
        print(json.dumps(line), flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------- the checks
def check_reference(plan: dict) -> dict:
    """``flipvqa eval`` of each reference case on the device, float32, TF32 off."""
    from flipvqa.cli import main as flipvqa

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    diffs, same = {}, True
    for case in CASES:
        with tempfile.TemporaryDirectory() as out:
            flags = case_flags(case, resume=case_dir(case) / "checkpoint.pth", output_dir=out, batch_size=4,
                               device=plan["device"], dtype="fp32")
            with contextlib.redirect_stdout(sys.stderr):  # its report; stdout carries the JSON lines
                status = flipvqa(["-q", "eval", *flags])
            if status != 0:
                return {"pass": False, "error": f"flipvqa eval failed on the {case} case"}
            got = [json.loads(line) for line in open(Path(out) / "predictions_val.jsonl")]
        want = expected_val(case)
        diffs[case] = max(abs(a - b) for row in got for a, b in zip(row["scores"], want[row["index"]][0]))
        same &= len(got) == len(want) and all(row["prediction"] == want[row["index"]][1] for row in got)
    return {"pass": same and max(diffs.values()) < 1e-4, "max_abs_diff": diffs, "predictions_equal": same}


def check_bf16(plan: dict) -> dict:
    """The benchmark model's option scores in float32 and with its backbone in bf16."""
    from flipvqa import bench
    from flipvqa.config import resolve

    device = torch.device(plan["device"])
    args = resolve(argparse.Namespace(model=plan["bf16_model"], tokenizer_path=TOKENIZER, device=plan["device"],
                                      dtype="fp32", max_seq_len=128, seed=0))
    model, tokenizer, _ = bench.bench_model(args, device)
    _, questions, _ = bench.bench_datasets(args, tokenizer, 64)
    fp32 = bench.option_scores(model, questions, 64, 8, device, torch.float32)
    model.backbone.to(torch.bfloat16)
    bf16 = bench.option_scores(model, questions, 64, 8, device, torch.bfloat16)
    agree = (fp32.argmin(1) == bf16.argmin(1)).float().mean().item()
    diff = (fp32 - bf16).abs().max().item()
    return {"pass": agree >= 0.95 and diff < 0.15, "model": plan["bf16_model"], "questions": 64,
            "prediction_agreement": agree, "max_abs_score_diff": diff}


def check_bench(plan: dict) -> dict:
    """``bench --compare`` in bf16, plain and (on a GPU) with --compile."""
    runs = {}
    for compiled in (False, True):
        if compiled and not plan["compile"]:
            runs["compile"] = {"skipped": "dry run: torch.compile is not run on the CPU"}
            continue
        flags = _bench_flags(plan, plan["bench_model"], plan["steps"], plan["warmup"]) + ["--compare"]
        result = _bench(flags + (["--compile"] if compiled else []))
        runs["compile" if compiled else "plain"] = {
            "train_speedup": result["train_speedup"], "eval_speedup": result["eval_speedup"],
            **{f"{mode}_{key}": result[mode].get(key) for mode in ("fast", "naive")
               for key in ("train_samples_per_s", "eval_questions_per_s", "mfu", "peak_memory_mb")}}
        runs.setdefault("device_name", result["fast"]["config"]["device_name"])
    return {"model": plan["bench_model"], "dtype": plan["dtype"], **runs}


def check_quantize(plan: dict) -> dict:
    """Peak memory and weight bytes of the backbone in bf16, int8 and nf4."""
    shapes = {}
    for model in plan["quantized"]:
        shapes[model] = {}
        for mode in (None, "int8", "nf4"):
            flags = _bench_flags(plan, model, plan["quant_steps"], 1) + (["--quantize", mode] if mode else [])
            result = _bench(flags)
            shapes[model][mode or plan["dtype"]] = {key: result[key] for key in QUANTIZE_FIGURES}
    note = "peak: CUDA max_memory_allocated (weights included); CPU: RSS above the built model"
    return {"dtype": plan["dtype"], "memory_note": note, **shapes}


def check_generate(plan: dict) -> dict:
    """``bench --generate``: generated tokens/s cached, recomputing every step, and transformers'
    generate, on the bf16 benchmark model (batch 8, NExT-QA-style prompts, 32 new tokens)."""
    flags = ["--model", plan["bf16_model"], "--device", plan["device"], "--dtype", plan["dtype"],
             "--tokenizer_path", TOKENIZER, "--batch_size", "8", "--max_seq_len", "128", "--max_new_tokens", "32",
             "--steps", str(plan["steps"]), "--warmup", str(plan["warmup"]), "--generate"]
    result = _bench(flags)
    keys = ("cached_tokens_per_s", "naive_tokens_per_s", "transformers_tokens_per_s", "speedup_vs_naive",
            "ratio_vs_transformers")
    return {"model": plan["bf16_model"], **{k: result[k] for k in keys}}


CHECKS = {"reference": check_reference, "bf16": check_bf16, "bench": check_bench, "quantize": check_quantize,
          "generate": check_generate}


# ---------------------------------------------------------------------------- running flipvqa bench
def _bench_flags(plan: dict, model: str, steps: int, warmup: int) -> list[str]:
    return ["--model", model, "--device", plan["device"], "--dtype", plan["dtype"], *BENCH_FLAGS,
            "--steps", str(steps), "--warmup", str(warmup), "--synthetic", str(plan["synthetic"])]


def _bench(flags: list[str]) -> dict:
    """The JSON line of ``python -m flipvqa bench FLAGS`` (run from this checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "flipvqa", "bench", *flags], stdout=subprocess.PIPE, text=True,
                          env=env, timeout=600, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"flipvqa bench {' '.join(flags)} exited {proc.returncode} (its stderr is above)")
    return json.loads(lines[-1])


if __name__ == "__main__":
    sys.exit(main())
