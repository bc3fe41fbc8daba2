"""The reference cases (copied from the authors' runs into fixtures/reference): where they are,
what they expected, and the flags they ran with. Plain Python (no pytest), so that
benchmarks/gpu_checks.py can check them on a GPU too."""

from __future__ import annotations

import json
from pathlib import Path

REF = Path(__file__).parent / "fixtures" / "reference"
CASES = ["nextqa", "star", "dramaqa", "vlep", "tvqa"]


def case_dir(name: str) -> Path:
    return REF / "cases" / name


def expected(name: str) -> dict:
    return json.loads((case_dir(name) / "expected.json").read_text())


def expected_val(name: str) -> dict[int, tuple[list[float], int]]:
    """The reference's (option scores, prediction) of each val question, by its index."""
    return {i: (s, p) for b in expected(name)["val"]["batches"]
            for i, s, p in zip(b["index"], b["scores"], b["prediction"])}


def case_flags(name: str, **overrides) -> list[str]:
    """The CLI flags the reference ran the case with (names as in the authors' train.py)."""
    case = json.loads((case_dir(name) / "case.json").read_text())
    root = case_dir(name)
    flags = ["--dataset", case["dataset"], "--data_path", str(root / case["data_path"]),
             "--llama_model_path", str(root / case["llama_model_path"]), "--model", case["model"],
             "--num_workers", "0"]
    for key in ("max_seq_len", "max_feats", "adapter_len", "adapter_layer", "bias", "tau"):
        flags += [f"--{key}", str(case[key])]
    flags += [f"--{key}" for key in ("vaq", "qav", "sub") if case[key]]
    for key, value in overrides.items():
        flags += [f"--{key}", str(value)]
    return flags
