"""Shared fixtures; the reference cases' helpers live in reference.py."""

from __future__ import annotations


import pytest
import torch

torch.set_num_threads(2)

from reference import CASES, REF, case_dir, case_flags, expected, expected_val  # noqa: F401 (re-exported)


@pytest.fixture(scope="session")
def llama_tokenizer():
    from flipvqa.tokenizer import load_tokenizer

    return load_tokenizer(REF / "llama" / "tokenizer.model")
