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


def TORCHRUN_PORT() -> list[str]:  # noqa: N802 - spliced into torchrun command lines
    """``--master_port`` on a free port: two torchrun tests (or a test and another job) never share
    torchrun's default 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return ["--master_port", str(sock.getsockname()[1])]
