"""``benchmarks/gpu.sh --dry-run``: every GPU check runs on the CPU with tiny models and prints one
JSON line each (the figures themselves come from a real GPU; benchmarks/RESULTS.md)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def test_dry_run_prints_one_passing_line_per_check():
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["check"] for line in lines] == ["reference", "bf16", "bench", "quantize", "generate"]
    reference, bf16, bench, quantize, generate = lines
    assert reference["pass"] and set(reference["max_abs_diff"]) == {"nextqa", "star", "dramaqa", "vlep", "tvqa"}
    assert max(reference["max_abs_diff"].values()) < 1e-4
    assert bf16["pass"] and bf16["prediction_agreement"] >= 0.95 and 0 < bf16["max_abs_score_diff"] < 0.15
    plain = bench["plain"]
    assert plain["train_speedup"] > 0 and plain["eval_speedup"] > 0 and plain["fast_peak_memory_mb"] >= 0
    assert "skipped" in bench["compile"]
    sizes = {mode: figures["backbone_weights_mb"] for mode, figures in quantize["bench-128"].items()}
    assert sizes["nf4"] < sizes["int8"] < sizes["fp32"]
    assert generate["cached_tokens_per_s"] > 0 and generate["naive_tokens_per_s"] > 0
    assert generate["transformers_tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_points_to_the_dry_run():
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert "--dry-run" in run.stderr and "Traceback" not in run.stderr
