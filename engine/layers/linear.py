"""Tensor-parallel linear layers (Megatron style).

ColumnParallelLinear splits the output features across ranks; RowParallelLinear splits the input
features and all-reduces its partial sums. QKV and gate/up projections are column-parallel layers
whose checkpoint shards are several HF tensors: their `load_shard` knows where each one goes.

Loaders hand `load_full` / `load_shard` either a tensor or a lazy checkpoint weight (anything
with `.shape` and `.narrow(dim, start, length)`); the layers only ever `narrow` it, so a rank
reads from disk just the slice it holds.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import dispatch
from engine.parallel import ParallelContext, divide, kv_heads_of_rank


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across tensor-parallel ranks."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelContext,
                 bias: bool = False, gather_output: bool = False,
                 out_per_rank: int | None = None) -> None:
        """`out_per_rank` overrides the even split (fused layers with replicated shards)."""
        super().__init__()
        self.parallel = parallel
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        if out_per_rank is None:
            out_per_rank = divide(out_features, self.tp_size, "output features")
        self.out_per_rank = out_per_rank
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(out_per_rank, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_per_rank), requires_grad=False) if bias else None

    def load_full(self, param: nn.Parameter, loaded) -> None:
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
        return self.parallel.all_gather_last_dim(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (e.g. gate+up)."""

    def __init__(self, in_features: int, out_sizes: dict[str, int], parallel: ParallelContext,
                 bias: bool = False, rank_rows: dict[str, tuple[int, int]] | None = None) -> None:
        """`rank_rows`: shard -> (first checkpoint row, row count) this rank holds; by default
        each shard splits evenly across the tensor ranks."""
        if rank_rows is None:
            rank_rows = {}
            for name, size in out_sizes.items():
                per_rank = divide(size, parallel.tp_size, f"{name} features")
                rank_rows[name] = (parallel.tp_rank * per_rank, per_rank)
        total = sum(count for _, count in rank_rows.values())
        super().__init__(in_features, sum(out_sizes.values()), parallel, bias, out_per_rank=total)
        self.shard_offsets: dict[str, tuple[int, int]] = {}  # shard -> (row in param, rows)
        self.shard_starts: dict[str, int] = {}  # shard -> first checkpoint row of this rank
        offset = 0
        for name, (start, count) in rank_rows.items():
            self.shard_offsets[name] = (offset, count)
            self.shard_starts[name] = start
            offset += count

    def load_shard(self, param: nn.Parameter, loaded, shard: str) -> None:
        offset, size = self.shard_offsets[shard]
        src = loaded.narrow(0, self.shard_starts[shard], size)
        param.data.narrow(0, offset, size).copy_(src)


class QKVParallelLinear(MergedColumnParallelLinear):
    """The fused q/k/v projection; with GQA, K and V have fewer heads than Q.

    Query heads split evenly; KV heads split when tp divides them, else each rank holds the one
    KV head its query heads use (see `kv_heads_of_rank`).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 parallel: ParallelContext, bias: bool = False) -> None:
        q_heads = divide(num_heads, parallel.tp_size, "num_heads")
        first_kv, kv_heads = kv_heads_of_rank(num_kv_heads, parallel)
        kv_rows = (first_kv * head_dim, kv_heads * head_dim)
        rank_rows = {"q": (parallel.tp_rank * q_heads * head_dim, q_heads * head_dim),
                     "k": kv_rows, "v": kv_rows}
        sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                 "v": num_kv_heads * head_dim}
        super().__init__(hidden_size, sizes, parallel, bias, rank_rows)
        self.num_heads_per_rank = q_heads
        self.num_kv_heads_per_rank = kv_heads
        self.q_size = self.shard_offsets["q"][1]
        self.kv_size = self.shard_offsets["k"][1]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelContext,
                 bias: bool = False) -> None:
        super().__init__()
        self.parallel = parallel
        self.tp_rank = parallel.tp_rank
        self.in_per_rank = divide(in_features, parallel.tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load_full(self, param: nn.Parameter, loaded) -> None:
        if param is self.bias:  # added once, after the all-reduce: every rank holds all of it
            param.data.copy_(loaded.narrow(0, 0, loaded.shape[0]))
            return
        param.data.copy_(loaded.narrow(1, self.tp_rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(dispatch.linear(x, self.weight))

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for x = [gate | up]: the activation fused into the projection
        where `dispatch` can (one row on CUDA)."""
        return self._reduce(dispatch.silu_and_mul_linear(x, self.weight))

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(y)
        return y + self.bias if self.bias is not None else y
