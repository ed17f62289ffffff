"""Paged attention backends. `get_backend` picks Triton on CUDA when available, else torch."""

from __future__ import annotations

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.attention.torch_ref import TorchAttentionBackend


def get_backend(name: str, device: str):
    """name: auto | torch | triton."""
    if name == "torch" or (name == "auto" and device != "cuda"):
        return TorchAttentionBackend()
    try:
        from engine.kernels.attention_backend import TritonAttentionBackend
    except ImportError as exc:
        if name == "triton":
            raise ValueError(f"attention backend 'triton' is unavailable: {exc}") from exc
        return TorchAttentionBackend()
    return TritonAttentionBackend()


__all__ = ["AttentionMetadata", "SeqGroup", "TorchAttentionBackend", "get_backend"]
