#!/usr/bin/env bash
# Every GPU check in one run (at most about 8 minutes on an H100/H200), one JSON line per check:
# the reference cases in float32 on CUDA, bf16 against float32, bench --compare on the LLaMA-7B
# shape (plain and --compile), and --quantize int8/nf4 memory on the 7B and 13B shapes.
#   bash benchmarks/gpu.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu.sh --dry-run   # the same checks on the CPU with tiny models
# --quantize needs torchao (pip install -e ".[quant]"); record the figures in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_checks.py "$@"
