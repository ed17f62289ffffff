"""Which KV caches can exchange blocks: the layout spec, its hash, and the compatibility check.

Two engines may hand KV blocks to each other only when they would read the same bytes the same
way: same model, dtype, block size, layout and shapes, and the same pdserve version (the layout
is ours and may change between versions). The hash is what the handshake compares; the fields
travel with it so a refusal can list every field that differs. The parallel layouts are not
compared but mapped (planner.py): a prefill TP=1 may feed a decode TP=2, and each channel end
announces its rank, whose KV shard follows from the layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import torch

import pdserve
from kv_transfer.errors import KVTransferIncompatibleError
from kv_transfer.planner import (KVShard, ModelShape, ParallelLayout, layout_problems,
                                 message_between, plan_transfer, rank_shard)

# [num_layers, num_blocks, 2 (K then V), block_size, num_kv_heads, head_dim]
KV_LAYOUT_LBKVHD = "LBKVHD"
SUPPORTED_LAYOUTS = (KV_LAYOUT_LBKVHD,)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling used in specs and handshakes."""
    return str(dtype).removeprefix("torch.")


# The fields that describe where a rank sits in its instance: not compared between the two ends
# (the planner maps one layout onto the other), every other field must be equal.
LAYOUT_FIELDS = ("parallel_layout", "rank")


@dataclass(frozen=True, slots=True)
class KVLayoutSpec:
    """What must match between two engines for their KV blocks to be interchangeable, plus where
    this channel end's rank sits in its instance (its KV shard)."""

    model_name: str
    dtype: str  # dtype_name() of the cache, e.g. "bfloat16"
    block_size: int  # tokens per block
    num_layers: int  # the model's decoder layers (a rank's cache holds its stage's)
    num_kv_heads: int  # the model's KV heads (a rank's cache holds its tensor rank's)
    head_dim: int
    kv_layout: str = KV_LAYOUT_LBKVHD
    pdserve_version: str = pdserve.__version__
    # planner.ParallelLayout.name of this end's instance, and this end's rank in it: the two
    # ends may differ (the KV is re-sharded on the way) as long as the layouts can be mapped.
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
        problems = layout_problems(self.layout, self.model, "this")
        if problems:
            raise ValueError(f"KVLayoutSpec: {problems[0]}")
        if not 0 <= self.rank < self.layout.world_size:
            raise ValueError(f"KVLayoutSpec.rank {self.rank} is outside {self.parallel_layout}")

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout.parse(self.parallel_layout)

    @property
    def model(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_kv_heads)

    @property
    def shard(self) -> KVShard:
        """The layers x KV heads this rank's cache holds (model coordinates)."""
        return rank_shard(self.layout, self.model, self.rank)

    @classmethod
    def for_cache(cls, kv_cache: torch.Tensor, model_name: str,
                  parallel_layout: str = "tp=1 pp=1", rank: int = 0,
                  model: ModelShape | None = None) -> KVLayoutSpec:
        """The spec of an LBKVHD cache tensor [layers, blocks, 2, block_size, heads, head_dim]:
        one rank's of an instance of `parallel_layout` serving `model` (default: the cache
        holds the whole model, as a one-rank instance's does)."""
        if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        if model is not None:
            num_layers, num_kv_heads = model.num_layers, model.num_kv_heads
        spec = cls(model_name, dtype_name(kv_cache.dtype), block_size, num_layers,
                   num_kv_heads, head_dim, parallel_layout=parallel_layout, rank=rank)
        spec.check_cache(kv_cache)
        return spec

    @classmethod
    def for_engine_rank(cls, kv_cache: torch.Tensor, model_config, parallel_config,
                        rank: int = 0) -> KVLayoutSpec:
        """The spec of rank `rank` of an engine instance: its model config (name, layers, KV
        heads) and its ParallelConfig (tensor and pipeline sizes, pipeline_layers)."""
        par = parallel_config
        stages = getattr(par, "pipeline_layers", None)
        layout = ParallelLayout(par.tensor_parallel_size, par.pipeline_parallel_size,
                                tuple(stages) if stages else None)
        return cls.for_cache(kv_cache, model_config.name, layout.name, rank,
                             ModelShape(model_config.num_layers, model_config.num_kv_heads))

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Raise ValueError unless `kv_cache` is this rank's: its shard's layers and heads, this
        spec's block size, head size and dtype."""
        shard = self.shard
        want = (shard.num_layers, 2, self.block_size, shard.num_heads, self.head_dim)
        got = (kv_cache.shape[0], *kv_cache.shape[2:]) if kv_cache.dim() == 6 else None
        if got != want or dtype_name(kv_cache.dtype) != self.dtype:
            raise ValueError(
                f"kv_cache does not match the channel's KV layout: want {self.dtype} "
                f"[layers={want[0]}, blocks, 2, block_size={want[2]}, kv_heads={want[3]}, "
                f"head_dim={want[4]}] (rank {self.rank} of {self.parallel_layout}: {shard}), "
                f"got {dtype_name(kv_cache.dtype)} {tuple(kv_cache.shape)}")


def compat_hash(spec: KVLayoutSpec) -> str:
    """sha256 (hex) of the compared fields (all but LAYOUT_FIELDS) as canonical JSON."""
    compared = {k: v for k, v in asdict(spec).items() if k not in LAYOUT_FIELDS}
    canonical = json.dumps(compared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def differing_fields(local: KVLayoutSpec, remote: KVLayoutSpec) -> list[str]:
    """'field: local=... remote=...' for every compared field that differs, in declaration
    order (the layout fields are mapped, not compared: see `mapping_problems`)."""
    diffs = []
    for field in fields(KVLayoutSpec):
        if field.name in LAYOUT_FIELDS:
            continue
        mine, theirs = getattr(local, field.name), getattr(remote, field.name)
        if mine != theirs:
            note = BLOCK_SIZE_NOTE if field.name == "block_size" else ""
            diffs.append(f"{field.name}: local={mine!r} remote={theirs!r}{note}")
    return diffs


# Blocks move 1:1 (a block id names the same tokens on both ends): no re-blocking on unpack.
BLOCK_SIZE_NOTE = (" (both pools must use the same block size: KV blocks move 1:1 and are not "
                   "re-blocked)")


def mapping_problems(prefill: KVLayoutSpec, decode: KVLayoutSpec) -> list[str]:
    """Why these two channel ends cannot carry a shard of the plan between their instances'
    layouts (a layout that cannot hold the model, or two ranks the plan never pairs)."""
    try:
        plan = plan_transfer(prefill.layout, decode.layout, prefill.model)
    except ValueError as exc:
        return [f"parallel layouts cannot be mapped: {exc}"]
    if message_between(plan, prefill.rank, decode.rank) is None:
        return [f"parallel layouts: prefill rank {prefill.rank} of {prefill.parallel_layout} "
                f"sends nothing to decode rank {decode.rank} of {decode.parallel_layout} "
                f"(no channel between them in the transfer plan)"]
    return []


def check_compatible(local: KVLayoutSpec, remote: KVLayoutSpec) -> None:
    """Raise KVTransferIncompatibleError listing every differing compared field, if any."""
    diffs = differing_fields(local, remote)
    if diffs:
        raise KVTransferIncompatibleError(
            "KV layouts are incompatible, refusing the pair channel: " + "; ".join(diffs)
        )
