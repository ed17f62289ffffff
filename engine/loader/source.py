"""Open a model by name: the built-in default, a `.gguf` file or a Hugging Face model folder.

Every source reports a `ModelConfig` and yields weights under HF Llama names, so the model code
never sees a file format.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from engine.loader.default_model import default_gguf_path
from engine.loader.gguf_loader import open_gguf_model
from engine.loader.hf import open_hf_model
from engine.models.config import ModelConfig
from engine.tokenizer import Tokenizer

DEFAULT_MODEL = "default"
_EXPECTED = (
    f"expected {DEFAULT_MODEL!r}, a .gguf file or a Hugging Face model folder "
    "(config.json + *.safetensors + tokenizer files)"
)


class ModelSource(Protocol):
    """An opened model: its architecture, its weights (HF Llama names) and its tokenizer.

    `iter_weights` yields float32 tensors for GGUF (dequantized) and the stored dtype for
    safetensors, all on CPU; `lm_head.weight` is absent when embeddings are tied.
    """

    config: ModelConfig
    path: Path

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def iter_lazy_weights(self) -> Iterator[tuple[str, object]]:
        """Like `iter_weights`, but each weight is read only through `.narrow(dim, start,
        length)` (see engine.models.weights), so a rank reads only the slices it holds."""
        ...

    def load_tokenizer(self) -> Tokenizer: ...


def open_model(model: str | Path) -> ModelSource:
    """Open `model`: "default", a path to a `.gguf` file, or an HF model folder."""
    if str(model) == DEFAULT_MODEL:
        return open_gguf_model(default_gguf_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return open_hf_model(path)
    if path.is_file() and path.suffix == ".gguf":
        return open_gguf_model(path)
    problem = "is not a .gguf file" if path.is_file() else "does not exist"
    raise ValueError(f"model {str(path)!r} {problem}; {_EXPECTED}")
