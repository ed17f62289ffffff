"""Model loading: files on disk to a `ModelConfig`, HF-named weights and a `Tokenizer`."""

from engine.loader.default_model import default_gguf_path
from engine.loader.source import DEFAULT_MODEL, ModelSource, open_model

__all__ = ["DEFAULT_MODEL", "ModelSource", "default_gguf_path", "open_model"]
