"""Tile configurations of the prefill attention kernel, per GPU and attention shape.

`prefill_attention_configs.json` (beside this file) is written by
`benchmarks/prefill_attention_sweep.py` on the GPU it names. Its keys name a GPU and shape,
"gpu=NVIDIA H200,dtype=bfloat16,head_dim=128,group=4" (group: query heads per KV head), and
map to one `PrefillTileConfig` as a dict of its fields. A shape never swept on this GPU gets
`default_config`, the configuration the kernel shipped with before the sweep existed.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

CONFIG_PATH = Path(__file__).with_name("prefill_attention_configs.json")


@dataclass(frozen=True, slots=True)
class PrefillTileConfig:
    """One launch configuration of `_prefill_kernel`.

    block_m: rows of the query tile (query tokens x packed heads); block_n: keys per step;
    pack_gqa: one program serves every query head of a KV head (rows = block_m // group tokens
    x group heads), so each K/V tile is loaded once per group instead of once per head;
    table_vec: each key tile reads its block_n // block_size block ids as one vector and builds
    the row addresses from them (instead of one table lookup per key);
    warp_specialize: producer/consumer warp specialization of the key loop (Triton >= 3.4,
    compiled GPUs only; ignored where unsupported);
    heads_first: the grid's fastest axis walks heads, so every head's heaviest query tile is
    launched before any lighter one (without it: one head's tiles heaviest first, then the
    next head's)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    pack_gqa: bool = False
    table_vec: bool = False
    warp_specialize: bool = False
    heads_first: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages must be in 1..8, got {self.num_stages}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> PrefillTileConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown prefill tile config fields: {sorted(unknown)}")
        return cls(**raw)

    def label(self) -> str:
        flags = "".join(f"+{name}" for name, on in (("pack", self.pack_gqa),
                                                     ("tvec", self.table_vec),
                                                     ("ws", self.warp_specialize),
                                                     ("hf", self.heads_first)) if on)
        return (f"M{self.block_m}N{self.block_n}w{self.num_warps}s{self.num_stages}{flags}")


def shape_key(gpu: str, dtype: torch.dtype, head_dim: int, group: int) -> str:
    return f"gpu={gpu},dtype={str(dtype).removeprefix('torch.')},head_dim={head_dim},group={group}"


def default_config(dtype: torch.dtype, head_dim: int) -> PrefillTileConfig:
    """The pre-sweep configuration (float32 needs small tiles: its dots are ieee)."""
    if dtype == torch.float32:
        return PrefillTileConfig(64, 32, 4, 2)
    if head_dim <= 64:
        return PrefillTileConfig(128, 64, 4, 3)
    return PrefillTileConfig(128, 64, 8, 3)


@functools.lru_cache(maxsize=None)
def _swept(path: Path) -> dict[str, PrefillTileConfig]:
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {key: PrefillTileConfig.from_json(cfg) for key, cfg in raw.get("configs", {}).items()}


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The GPU's name ("NVIDIA H200"), or "cpu" (the interpreter), cached per device."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def get_config(device: torch.device, dtype: torch.dtype, head_dim: int, group: int,
               path: Path | None = None) -> PrefillTileConfig:
    """The swept configuration of this GPU and shape, else `default_config`."""
    return _lookup(device, dtype, head_dim, group, path or CONFIG_PATH)


@functools.lru_cache(maxsize=None)
def _lookup(device: torch.device, dtype: torch.dtype, head_dim: int, group: int,
            path: Path) -> PrefillTileConfig:
    if dtype == torch.float32:
        return default_config(dtype, head_dim)
    key = shape_key(device_name(device), dtype, head_dim, group)
    return _swept(path).get(key) or default_config(dtype, head_dim)


def write_config(key: str, config: PrefillTileConfig, path: Path | None = None) -> None:
    """Store `config` under `key` in the JSON (other keys kept) and forget the loaded copy."""
    path = path or CONFIG_PATH
    raw = json.loads(path.read_text()) if path.exists() else {}
    raw.setdefault("configs", {})[key] = config.to_json()
    raw["configs"] = dict(sorted(raw["configs"].items()))
    path.write_text(json.dumps(raw, indent=2) + "\n")
    clear_cache()


def clear_cache() -> None:
    """Forget the loaded JSON (after a sweep rewrote it)."""
    _swept.cache_clear()
    _lookup.cache_clear()
