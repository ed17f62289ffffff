"""Which KV caches can exchange blocks: the layout spec, its hash, and the compatibility check.

Two engines may hand KV blocks to each other only when they would read the same bytes the same
way: same model, dtype, block size, layout and shapes, and the same pdserve version (the layout
is ours and may change between versions). The hash is what the handshake compares; the fields
travel with it so a refusal can list every field that differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import torch

import pdserve
from kv_transfer.errors import KVTransferIncompatibleError

# [num_layers, num_blocks, 2 (K then V), block_size, num_kv_heads, head_dim]
KV_LAYOUT_LBKVHD = "LBKVHD"
SUPPORTED_LAYOUTS = (KV_LAYOUT_LBKVHD,)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling used in specs and handshakes."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class KVLayoutSpec:
    """What must match between two engines for their KV blocks to be interchangeable."""

    model_name: str
    dtype: str  # dtype_name() of the cache, e.g. "bfloat16"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = KV_LAYOUT_LBKVHD
    pdserve_version: str = pdserve.__version__
    # A multi-rank instance's rank i pairs with rank i of a peer of the same layout: its cache
    # holds its stage's layers and its KV heads (num_layers and num_kv_heads above are its own).
    parallel_layout: str = "tp=1 pp=1"
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayoutSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_layout not in SUPPORTED_LAYOUTS:
            raise ValueError(
                f"unknown kv_layout {self.kv_layout!r}; supported: {', '.join(SUPPORTED_LAYOUTS)}"
            )
        if not self.model_name:
            raise ValueError("KVLayoutSpec.model_name must not be empty")

    @classmethod
    def for_cache(cls, kv_cache: torch.Tensor, model_name: str,
                  parallel_layout: str = "tp=1 pp=1", rank: int = 0) -> KVLayoutSpec:
        """The spec of an LBKVHD cache tensor [layers, blocks, 2, block_size, heads, head_dim]
        (one rank's, for a multi-rank instance)."""
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(model_name, dtype_name(kv_cache.dtype), block_size, num_layers,
                   num_kv_heads, head_dim, parallel_layout=parallel_layout, rank=rank)

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Raise ValueError unless `kv_cache` has this spec's layout, shapes and dtype."""
        actual = KVLayoutSpec.for_cache(kv_cache, self.model_name, self.parallel_layout,
                                        self.rank)
        diffs = differing_fields(self, actual)
        if diffs:
            raise ValueError(f"kv_cache does not match the channel's KV layout: {'; '.join(diffs)}")


def compat_hash(spec: KVLayoutSpec) -> str:
    """sha256 (hex) of the spec's fields as canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(asdict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def differing_fields(local: KVLayoutSpec, remote: KVLayoutSpec) -> list[str]:
    """'field: local=... remote=...' for every field that differs, in declaration order."""
    diffs = []
    for field in fields(KVLayoutSpec):
        mine, theirs = getattr(local, field.name), getattr(remote, field.name)
        if mine != theirs:
            diffs.append(f"{field.name}: local={mine!r} remote={theirs!r}")
    return diffs


def check_compatible(local: KVLayoutSpec, remote: KVLayoutSpec) -> None:
    """Raise KVTransferIncompatibleError listing every differing field, if any."""
    diffs = differing_fields(local, remote)
    if diffs:
        raise KVTransferIncompatibleError(
            "KV layouts are incompatible, refusing the pair channel: " + "; ".join(diffs)
        )
