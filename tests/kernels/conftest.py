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


# In Triton's interpreter (CI) some cases repeat code paths their siblings already run, at a
# high cost (~4 minutes together): the fp16 cases of four heavy tests (their fp32 cases run the
# same kernel code) and the 32-token-block cases of cached-context prefill beyond one head
# layout (16-token blocks run every layout). They run natively on the GPU
# (benchmarks/gpu_suite.sh tests) and in the interpreter under `make test-slow`. Likewise decode
# attention's automatic split count beyond one head layout (its explicit 1 and 4 splits run every
# layout; ~60 s), and top-p's flat rows over a whole 128k vocabulary (~25 s; the whole-row search
# it ends in runs in test_whole_row_search_with_ties_and_masks).
_FP16_SLOW_IN_INTERPRETER = frozenset({
    "test_prefill_with_cached_context_matches_reference",
    "test_decode_over_fp8_matches_reference",
    "test_prefill_over_fp8_matches_reference",
    "test_fused_combine_equals_two_kernels_and_reference",
})


def _slow_in_interpreter(name: str | None, params: dict) -> bool:
    if name in _FP16_SLOW_IN_INTERPRETER and params.get("dtype") is torch.float16:
        return True
    if name == "test_decode_matches_reference":
        return params.get("num_splits") is None and params.get("heads") != (8, 2, 64)
    if name == "test_flat_rows_at_a_full_vocabulary":
        return True
    return (name == "test_prefill_with_cached_context_matches_reference"
            and params.get("block_size") == 32 and params.get("heads") != (8, 2, 64))


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items) -> None:
    if not INTERPRET or torch.cuda.is_available():
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if _slow_in_interpreter(getattr(item, "originalname", None), params):
            item.add_marker(pytest.mark.slow)
