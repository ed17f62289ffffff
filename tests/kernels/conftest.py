"""Kernel tests run on CUDA; with TRITON_INTERPRET=1 they also run on the CPU (slowly), which is
how kernels can be checked without a GPU. Without either they are skipped."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="session")
def device() -> str:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1)")


@pytest.fixture(scope="session")
def cuda() -> None:
    """Skip unless a real CUDA device is there (end-to-end tests: no interpreter fallback)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run (the seed is printed on failure by the test's id)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed
