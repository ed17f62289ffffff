"""Tensor-parallel linear layers (Megatron style).

ColumnParallelLinear splits the output features across ranks; RowParallelLinear splits the input
features and all-reduces its partial sums. QKV and gate/up projections are column-parallel layers
whose checkpoint shards are several HF tensors: their `load_shard` knows where each one goes.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import dispatch
from engine.parallel import all_gather_last_dim, all_reduce, divide, tp_state


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across tensor-parallel ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 gather_output: bool = False) -> None:
        super().__init__()
        tp = tp_state()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        self.out_per_rank = divide(out_features, self.tp_size, "output features")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False) if bias else None

    def load_full(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Load a checkpoint tensor covering all output features; keep this rank's slice."""
        shard = loaded.narrow(0, self.tp_rank * self.out_per_rank, self.out_per_rank)
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather(dispatch.linear(x, self.weight, self.bias))

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) with h = x + residual (x when residual is None): the RMSNorm
        before a projection, fused into it where `dispatch` can (one row on CUDA)."""
        y, residual = dispatch.rms_norm_linear(x, residual, norm.weight, norm.eps, self.weight,
                                               self.bias)
        return self._gather(y), residual

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (e.g. gate+up)."""

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in out_sizes.items():
            per_rank = divide(size, self.tp_size, f"{name} features")
            self.shard_offsets[name] = (offset, per_rank)
            offset += per_rank

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        offset, size = self.shard_offsets[shard]
        src = loaded.narrow(0, self.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(src)


class QKVParallelLinear(MergedColumnParallelLinear):
    """The fused q/k/v projection; with GQA, K and V have fewer heads than Q."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        super().__init__(hidden_size, sizes, bias)
        self.q_size = self.shard_offsets["q"][1]
        self.kv_size = self.shard_offsets["k"][1]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        tp = tp_state()
        self.tp_rank = tp.rank
        self.in_per_rank = divide(in_features, tp.world_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load_full(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param is self.bias:
            param.data.copy_(loaded)
            return
        param.data.copy_(loaded.narrow(1, self.tp_rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(dispatch.linear(x, self.weight))

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for x = [gate | up]: the activation fused into the projection
        where `dispatch` can (one row on CUDA)."""
        return self._reduce(dispatch.silu_and_mul_linear(x, self.weight))

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        y = all_reduce(y)
        return y + self.bias if self.bias is not None else y
