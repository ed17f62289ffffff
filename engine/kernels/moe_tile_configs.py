"""Tile configurations of the fused MoE GEMMs, per MoE shape and token count.

`fused_moe_configs.json` (beside this file) is written by `benchmarks/moe_kernel_bench.py
--sweep` on the H200. Its keys name a shape, "E=128,H=2048,I=768,topk=8,dtype=bfloat16", and
map token counts (the M buckets swept: 1, 8, 64, ...) to one `MoETileConfig` each, as a dict of
its fields. A lookup takes the nearest swept bucket by ratio; a shape never swept gets `default_config`,
chosen by how many pairs an expert receives on average (decode: few rows, wide K strips to
stream the weights; prefill: square tiles for tensor-core throughput).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

CONFIG_PATH = Path(__file__).with_name("fused_moe_configs.json")


@dataclass(frozen=True, slots=True)
class GemmTile:
    """One grouped GEMM's tile (BLOCK_M is shared by both GEMMs: it is the alignment)."""

    block_n: int
    block_k: int
    group_m: int = 8  # M blocks walked together so that a weight tile is reused from L2
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@dataclass(frozen=True, slots=True)
class MoETileConfig:
    block_m: int
    gate_up: GemmTile
    down: GemmTile

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {self.block_m}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> MoETileConfig:
        return cls(int(raw["block_m"]), GemmTile(**raw["gate_up"]), GemmTile(**raw["down"]))


def shape_key(num_experts: int, hidden_size: int, intermediate_size: int, top_k: int,
              dtype: torch.dtype) -> str:
    return (f"E={num_experts},H={hidden_size},I={intermediate_size},topk={top_k},"
            f"dtype={str(dtype).removeprefix('torch.')}")


def default_config(num_tokens: int, num_experts: int, top_k: int) -> MoETileConfig:
    """For shapes never swept: tiles sized by the average rows an expert receives."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        return MoETileConfig(16, GemmTile(64, 128, 1, 4, 4), GemmTile(64, 128, 1, 4, 4))
    if rows_per_expert <= 128:
        return MoETileConfig(64, GemmTile(64, 64, 8, 4, 4), GemmTile(64, 64, 8, 4, 4))
    return MoETileConfig(128, GemmTile(128, 64, 8, 8, 3), GemmTile(128, 64, 8, 8, 3))


@functools.lru_cache(maxsize=None)
def load_buckets(path: Path, from_json: Callable[[dict], T]) -> dict[str, dict[int, T]]:
    """A tiles JSON ({"configs": {shape key: {token bucket: config}}}) parsed once per file and
    config type; {} when the file is absent (every shape gets its default)."""
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {key: {int(m): from_json(cfg) for m, cfg in buckets.items()}
            for key, buckets in raw.get("configs", {}).items()}


def nearest_bucket(buckets: dict[int, T], num_tokens: int) -> T:
    """The configuration swept at the token count nearest `num_tokens` by ratio."""
    return buckets[min(buckets, key=lambda m: abs(math.log2(m / max(num_tokens, 1))))]


def get_config(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int,
               top_k: int, dtype: torch.dtype, path: Path | None = None) -> MoETileConfig:
    """The swept configuration of the nearest token bucket (by ratio), else `default_config`."""
    key = shape_key(num_experts, hidden_size, intermediate_size, top_k, dtype)
    buckets = load_buckets(path or CONFIG_PATH, MoETileConfig.from_json).get(key)
    if not buckets:
        return default_config(num_tokens, num_experts, top_k)
    return nearest_bucket(buckets, num_tokens)


def clear_cache() -> None:
    """Forget the loaded JSON files (after a sweep rewrote one)."""
    load_buckets.cache_clear()
