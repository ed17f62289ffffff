"""Which experts, and which slice of each, one rank of a MoE layer holds; and loading them.

Tensor parallel (ep_size 1): every expert, intermediate rows [r I/tp, (r+1) I/tp). Expert
parallel (ep_size = tp_size): the whole experts [r E/ep, (r+1) E/ep). `expert_map` turns a global
expert id into a local index (-1: held by another rank).

Checkpoint shards (engine.models.weights): per-expert tensors "gate.{e}" / "up.{e}" ([I, H]) and
"down.{e}" ([H, I]) for the global expert e; packed ones "gate_up" / "down" ([E, 2I, H] /
[E, H, I], transformers 5); GGUF's "gate" / "up" ([E, I, H] each) and "down". A rank narrows
every tensor to its experts (dimension 0 of a packed one) before reading it, so lazy weights of
other ranks' experts stay on disk, and then slices its intermediate rows.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.parallel import ParallelContext

_EXPERT_SHARD = re.compile(r"(gate|up|down)\.(\d+)")


def local_expert_shape(num_experts: int, intermediate_size: int, tp_size: int,
                       ep_size: int) -> tuple[int, int]:
    """(experts, intermediate size) one rank holds: whole experts split over the ranks under
    expert parallelism, every expert's intermediate dimension split under plain TP."""
    if ep_size > 1:
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) is not divisible by expert "
                             f"parallel size {ep_size}")
        return num_experts // ep_size, intermediate_size
    if intermediate_size % tp_size:
        raise ValueError(f"moe intermediate_size ({intermediate_size}) is not divisible "
                         f"by tensor parallel size {tp_size} (not padded: use an expert "
                         f"parallel size of {tp_size} instead)")
    return num_experts, intermediate_size // tp_size


class ExpertShards:
    """This rank's experts and intermediate slice; `load_shard` / `expected_shards` for them."""

    w13: nn.Parameter
    w2: nn.Parameter

    def __init__(self, num_experts: int, intermediate_size: int,
                 parallel: ParallelContext) -> None:
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        rank = parallel.tp_rank
        self.num_local_experts, self.local_intermediate = local_expert_shape(
            num_experts, intermediate_size, parallel.tp_size, parallel.ep_size)
        split_experts = parallel.ep_size > 1
        self.first_expert = rank * self.num_local_experts if split_experts else 0
        self.intermediate_start = 0 if split_experts else rank * self.local_intermediate

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def make_expert_map(self) -> torch.Tensor | None:
        """int32 [E]: global expert -> local index, -1 elsewhere; None when all are local."""
        if self.num_local_experts == self.num_experts:
            return None
        mapping = torch.full((self.num_experts,), -1, dtype=torch.int32)
        mapping[self.local_experts.start:self.local_experts.stop] = torch.arange(
            self.num_local_experts, dtype=torch.int32)
        return mapping

    def expected_shards(self, param_name: str) -> tuple[str, ...]:
        """Every shard `param_name` needs before it is fully loaded (this rank's experts)."""
        kinds = ("gate", "up") if param_name == "w13" else ("down",)
        return tuple(f"{kind}.{e}" for e in self.local_experts for kind in kinds)

    def load_shard(self, param: nn.Parameter, loaded, shard: str) -> tuple[str, ...]:
        """Copy this rank's part of one checkpoint tensor into `param`; returns the shards it
        covered (an expert of another rank: covered without reading it)."""
        hidden = param.shape[-1] if param is self.w13 else param.shape[1]
        size, n = self.intermediate_size, self.num_local_experts
        if shard == "gate_up":
            _check_shape(loaded, (self.num_experts, 2 * size, hidden), shard)
            experts = loaded.narrow(0, self.first_expert, n)
            self._copy_rows(param.data, experts.narrow(1, 0, size), "gate")
            self._copy_rows(param.data, experts.narrow(1, size, size), "up")
            return self.expected_shards("w13")
        if shard == "down":
            _check_shape(loaded, (self.num_experts, hidden, size), shard)
            param.data.copy_(self._columns(loaded.narrow(0, self.first_expert, n)))
            return self.expected_shards("w2")
        if shard in ("gate", "up"):  # GGUF: each [E, I, H]
            _check_shape(loaded, (self.num_experts, size, hidden), shard)
            self._copy_rows(param.data, loaded.narrow(0, self.first_expert, n), shard)
            return tuple(f"{shard}.{e}" for e in self.local_experts)
        return self._load_one_expert(param, loaded, shard, hidden)

    def _load_one_expert(self, param: nn.Parameter, loaded, shard: str,
                         hidden: int) -> tuple[str, ...]:
        match = _EXPERT_SHARD.fullmatch(shard)
        if match is None or int(match[2]) >= self.num_experts:
            raise ValueError(f"unknown expert shard {shard!r} (experts 0..{self.num_experts - 1})")
        kind, expert = match[1], int(match[2])
        size = self.intermediate_size
        _check_shape(loaded, (hidden, size) if kind == "down" else (size, hidden), shard)
        if expert not in self.local_experts:
            return (shard,)  # another rank's expert: never read
        target = param.data[expert - self.first_expert]
        if kind == "down":
            target.copy_(loaded.narrow(1, self.intermediate_start, self.local_intermediate))
        else:
            rows = loaded.narrow(0, self.intermediate_start, self.local_intermediate)
            self._copy_rows(target.unsqueeze(0), rows.unsqueeze(0), kind)
        return (shard,)

    def _copy_rows(self, w13: torch.Tensor, rows: torch.Tensor, kind: str) -> None:
        """Copy this rank's intermediate rows of `rows` ([n, I or I_local, H]) into the gate or
        up half of `w13` ([n, 2 I_local, H])."""
        local = self.local_intermediate
        if rows.shape[1] != local:
            rows = rows.narrow(1, self.intermediate_start, local)
        w13.narrow(1, 0 if kind == "gate" else local, local).copy_(rows)

    def _columns(self, w2: torch.Tensor) -> torch.Tensor:
        return w2.narrow(2, self.intermediate_start, self.local_intermediate)


def _check_shape(loaded, expected: tuple[int, ...], shard: str) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"expert weight shape mismatch for shard {shard!r}: expected "
                         f"{expected}, checkpoint has {tuple(loaded.shape)}")
