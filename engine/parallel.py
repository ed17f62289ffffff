"""Tensor-parallel state of this process.

Layers ask this module for their rank, world size and the collectives they need; model files
never call `torch.distributed`. With world size 1 (the default) every collective is a no-op, so
the same layer code serves single-device and sharded instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TensorParallelState:
    """Rank and size of this process inside its instance's tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when world_size > 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"tp rank {self.rank} outside world size {self.world_size}")


_state = TensorParallelState()


def set_tensor_parallel_state(state: TensorParallelState) -> None:
    global _state  # one process = one rank: the state is per-process by construction
    _state = state


def tp_state() -> TensorParallelState:
    return _state


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.world_size == 1:
        return x
    dist.all_reduce(x, group=_state.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.group)
    return torch.cat(parts, dim=-1)
