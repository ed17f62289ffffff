"""Where this process sits inside its instance (tensor x pipeline ranks), and its collectives.

An instance of `tp * pp` ranks numbers them `rank = pp_rank * tp_size + tp_rank`: the ranks of
one pipeline stage are consecutive. Three kinds of groups, each a backend object built straight
from a store (never the global `init_process_group`, so an instance's groups and the KV-transfer
pair groups of the same process never meet):

- the stage's tensor group (the `tp_size` ranks of one stage): all-reduce (sum, max) and
  all-gather (of the last dimension, or of small per-row records stacked by rank);
- the pipeline group of one `tp_rank` (one rank per stage): activations, stage to next stage;
- the instance world: the last stage's tp_rank 0 sends each step's sampled ids to rank 0 (the
  engine core's), point to point, so that no other rank waits for them.

Layers receive a `ParallelContext` at construction; model files never call `torch.distributed`.
`ParallelContext.single()` (world size 1) makes every collective a no-op, and is the default.

Timeouts: a Gloo wait takes `timeout_s` itself. NCCL waits only order the CUDA stream (a host
wait per all-reduce would stall the GPU), so there the group's watchdog timeout bounds a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend, PrefixStore, ProcessGroupGloo, Store, Work

_PIPELINE_TAG = 7  # p2p tag of stage-to-stage activations
_RESULT_TAG = 8  # p2p tag of a step's sampled ids (and logprobs), last stage -> rank 0
_NCCL_WATCHDOG_MIN_S = 600.0  # NCCL's watchdog aborts a hung collective after this at least


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This rank's place in its instance and the groups it talks through (None: size 1)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    layer_start: int = 0  # first decoder layer of this stage (HF index)
    layer_end: int | None = None  # one past its last; None = every layer (single stage)
    tp_group: Backend | None = None  # this stage's tensor-parallel ranks
    pp_group: Backend | None = None  # this tp_rank's rank in every stage, rank = pp_rank
    world_group: Backend | None = None  # every rank of the instance, rank = `rank`
    timeout_s: float = 60.0  # bound of every Gloo wait
    is_nccl: bool = False  # groups carry CUDA tensors through NCCL
    # Expert parallelism runs over the tensor group: 1 (experts' intermediate dimension split
    # tp ways) or tp_size (each rank holds num_experts / tp whole experts; engine/layers/moe.py)
    ep_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tensor parallel size {self.tp_size}")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank {self.pp_rank} outside pipeline size {self.pp_size}")
        if self.layer_end is None and self.pp_size > 1:
            raise ValueError("a pipeline stage needs its layer range (layer_end is None)")
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(f"expert parallel size {self.ep_size} must be 1 or the tensor "
                             f"parallel size {self.tp_size} (experts split over the tensor ranks)")

    @classmethod
    def single(cls, num_layers: int | None = None) -> ParallelContext:
        """One rank holding the whole model: every collective is a no-op. Without
        `num_layers` it serves a model of any depth (`stage_layers` resolves the range)."""
        return cls(layer_end=num_layers)

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def layer_range(self) -> tuple[int, int]:
        """(start, end) of this stage's layers; only known to a context built for a model."""
        if self.layer_end is None:
            raise ValueError("this context covers every layer of whichever model it serves; "
                             "use stage_layers(num_layers)")
        return self.layer_start, self.layer_end

    def stage_layers(self, num_layers: int) -> tuple[int, int]:
        """(start, end) of this stage's layers in a model of `num_layers` layers."""
        end = num_layers if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= num_layers:
            raise ValueError(f"stage layers [{self.layer_start}, {end}) do not fit a model of "
                             f"{num_layers} layers")
        return self.layer_start, end

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the stage's tensor group, in place; returns x."""
        if self.tp_group is None:
            return x
        self._wait(self.tp_group.allreduce([x]), "tensor-parallel all-reduce")
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every tensor rank's `x` along the last dimension, in rank order."""
        if self.tp_group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        self._wait(self.tp_group.allgather([parts], [x.contiguous()]),
                   "tensor-parallel all-gather")
        return torch.cat(parts, dim=-1)

    def all_gather_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Every tensor rank's `x` (one shape on all), stacked in rank order: [tp_size, *shape].
        For a few numbers per row (the vocab-parallel sampler's candidates and winners)."""
        if self.tp_group is None:
            return x.unsqueeze(0)
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        self._wait(self.tp_group.allgather([parts], [x.contiguous()]),
                   "tensor-parallel all-gather of per-row records")
        return torch.stack(parts)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max of `x` over the stage's tensor group, in place; returns x."""
        if self.tp_group is None:
            return x
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MAX
        self._wait(self.tp_group.allreduce([x], options), "tensor-parallel all-reduce max")
        return x

    def send_next(self, tensors: Sequence[torch.Tensor]) -> None:
        """Send activations to the same tp_rank of the next stage (blocking until sent)."""
        if self.is_last_stage:
            raise ValueError("the last pipeline stage has no next stage to send to")
        group = self._group(self.pp_group, "pipeline")
        for t in tensors:
            work = group.send([t.contiguous()], self.pp_rank + 1, _PIPELINE_TAG)
            self._wait(work, "pipeline send")

    def recv_prev(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype,
                  device: torch.device | str) -> list[torch.Tensor]:
        """Receive the tensors `send_next` of the previous stage sent, one per shape."""
        if self.is_first_stage:
            raise ValueError("the first pipeline stage has no previous stage to receive from")
        group = self._group(self.pp_group, "pipeline")
        out = []
        for shape in shapes:
            t = torch.empty(tuple(shape), dtype=dtype, device=device)
            self._wait(group.recv([t], self.pp_rank - 1, _PIPELINE_TAG), "pipeline recv")
            out.append(t)
        return out

    @property
    def result_rank(self) -> int:
        """The rank that sends each step's sampled ids to rank 0: the last stage's tp_rank 0
        (every tensor rank of a stage samples the same ids)."""
        return (self.pp_size - 1) * self.tp_size

    def send_result(self, tensors: Sequence[torch.Tensor]) -> None:
        """On `result_rank`: one step's sampled ids (and logprobs) to rank 0, in order."""
        group = self._group(self.world_group, "world")
        for t in tensors:
            self._wait(group.send([t.contiguous()], 0, _RESULT_TAG), "send of sampled ids")

    def recv_result(self, tensors: Sequence[torch.Tensor]) -> list[Work]:
        """On rank 0: post the receives of one step's results into `tensors` and return at once
        (steps' results arrive in launch order); `wait_result` waits for them."""
        group = self._group(self.world_group, "world")
        return [group.recv([t], self.result_rank, _RESULT_TAG) for t in tensors]

    def wait_result(self, works: Sequence[Work]) -> None:
        for work in works:
            self._wait(work, "sampled ids from the last pipeline stage")

    def broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank gets the last stage's `tensor` (its tp_rank 0's), in place; returns it.

        Sampling runs identically on all last-stage tensor ranks, so any of them may be the root.
        """
        if self.world_group is None:
            return tensor
        options = dist.BroadcastOptions()
        options.rootRank = (self.pp_size - 1) * self.tp_size
        options.rootTensor = 0
        self._wait(self.world_group.broadcast([tensor], options), "broadcast from the last stage")
        return tensor

    def _group(self, group: Backend | None, what: str) -> Backend:
        if group is None:
            raise ValueError(f"this context has no {what} group: build it with "
                             "init_parallel_context to run collectives")
        return group

    def _wait(self, work: Work, what: str) -> None:
        if self.is_nccl:
            work.wait()  # orders the current stream only; the watchdog bounds a hang
            return
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            raise TimeoutError(f"{what} failed or exceeded {self.timeout_s}s on rank "
                               f"{self.rank}: {str(exc).splitlines()[0]}") from exc


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor parallel size "
                         f"{denominator}")
    return numerator // denominator


def split_layers(num_layers: int, pp_size: int,
                 pipeline_layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Each stage's (start, end) layers: `pipeline_layers` per stage, or an even split where
    earlier stages take the remainder (the last stage also runs the LM head)."""
    if pp_size < 1 or pp_size > num_layers:
        raise ValueError(f"pipeline parallel size {pp_size} must be between 1 and the model's "
                         f"{num_layers} layers")
    if pipeline_layers is None:
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (stage < extra) for stage in range(pp_size)]
    else:
        counts = [int(n) for n in pipeline_layers]
        if len(counts) != pp_size or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"pipeline_layers {counts} must give >= 1 layer to each of the "
                             f"{pp_size} stages and sum to the model's {num_layers} layers "
                             f"(they sum to {sum(counts)})")
    starts = [sum(counts[:stage]) for stage in range(pp_size)]
    return [(start, start + n) for start, n in zip(starts, counts)]


def check_parallel_sizes(model_config, tp_size: int, pp_size: int, ep_size: int = 1) -> None:
    """Raise a ValueError naming the sizes when the model cannot be split tp x pp ways (with
    experts split ep ways: `check_expert_parallel`).

    KV heads split when tp divides them and replicate when they divide tp (each rank then holds
    one KV head, shared by tp / num_kv_heads ranks).
    """
    cfg = model_config
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tp={tp_size}, pp={pp_size}")
    if cfg.num_heads % tp_size:
        raise ValueError(f"num_heads ({cfg.num_heads}) is not divisible by tensor parallel "
                         f"size {tp_size}")
    moe = getattr(cfg, "moe", None)
    has_dense = moe is None or not all(moe.is_sparse(i) for i in range(cfg.num_layers))
    if has_dense and cfg.intermediate_size % tp_size:
        raise ValueError(f"intermediate_size ({cfg.intermediate_size}) is not divisible by "
                         f"tensor parallel size {tp_size}")
    if moe is not None and moe.shared_expert_intermediate_size % tp_size:
        raise ValueError(f"moe shared_expert_intermediate_size "
                         f"({moe.shared_expert_intermediate_size}) is not divisible by tensor "
                         f"parallel size {tp_size}")
    if cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads:
        raise ValueError(f"num_kv_heads ({cfg.num_kv_heads}) and tensor parallel size {tp_size} "
                         "must divide one another")
    if pp_size > cfg.num_layers:
        raise ValueError(f"pipeline parallel size {pp_size} exceeds the model's "
                         f"{cfg.num_layers} layers")
    check_expert_parallel(cfg, tp_size, ep_size)


def check_expert_parallel(cfg, tp_size: int, ep_size: int) -> None:
    """Expert parallelism splits the experts over the tensor-parallel ranks (attention stays
    tensor parallel over the same ranks), so ep is 1 or tp; without it each expert's
    intermediate dimension splits tp ways."""
    moe = getattr(cfg, "moe", None)
    if ep_size == 1:
        if moe is not None and moe.intermediate_size % tp_size:
            raise ValueError(f"moe intermediate_size ({moe.intermediate_size}) is not divisible "
                             f"by tensor parallel size {tp_size}: each expert's intermediate "
                             "dimension splits across the tensor ranks (or set "
                             f"expert_parallel_size = {tp_size} to split whole experts)")
        return
    if moe is None:
        raise ValueError(f"expert_parallel_size {ep_size} needs a mixture-of-experts model; "
                         f"{cfg.architecture} is dense (set expert_parallel_size to 1)")
    if ep_size != tp_size:
        raise ValueError(f"expert_parallel_size ({ep_size}) must equal tensor_parallel_size "
                         f"({tp_size}): experts split over the instance's tensor-parallel ranks, "
                         "whose attention stays tensor parallel (1 turns expert parallelism off)")
    if moe.num_experts % ep_size:
        raise ValueError(f"moe num_experts ({moe.num_experts}) is not divisible by "
                         f"expert_parallel_size {ep_size}: each rank holds an equal range of "
                         "whole experts")


def init_parallel_context(store: Store, rank: int, tp_size: int, pp_size: int, num_layers: int,
                          device: torch.device | str, timeout_s: float,
                          pipeline_layers: Sequence[int] | None = None,
                          bind_host: str | None = "127.0.0.1",
                          ep_size: int = 1) -> ParallelContext:
    """Build this rank's groups; every rank of the instance calls it with the same sizes.

    Blocks until the peers of each group have joined or `timeout_s` passes. `store` is the
    instance's rendezvous store (prefixed here per group); `bind_host` is the address Gloo
    listens on (None: the host's default interface).
    """
    world_size = tp_size * pp_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size} "
                         f"(tp={tp_size} x pp={pp_size})")
    tp_rank, pp_rank = rank % tp_size, rank // tp_size
    start, end = split_layers(num_layers, pp_size, pipeline_layers)[pp_rank]
    is_nccl = torch.device(device).type == "cuda"

    def group(prefix: str, group_rank: int, size: int) -> Backend | None:
        if size == 1:
            return None
        sub = PrefixStore(prefix, store)
        if is_nccl:
            return _new_nccl_group(sub, group_rank, size, timeout_s)
        return new_gloo_group(sub, group_rank, size, timeout_s, bind_host)

    return ParallelContext(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size,
        layer_start=start, layer_end=end,
        tp_group=group(f"tp{pp_rank}", tp_rank, tp_size),
        pp_group=group(f"pp{tp_rank}", pp_rank, pp_size),
        world_group=group("world", rank, world_size),
        timeout_s=timeout_s, is_nccl=is_nccl, ep_size=ep_size)


def new_gloo_group(store: Store, rank: int, size: int, timeout_s: float,
                    bind_host: str | None) -> ProcessGroupGloo:
    """A Gloo group of `size` ranks from `store`; every wait bounded by `timeout_s`, listening on
    `bind_host` (None: the host's default interface). KV-transfer pair groups use it too."""
    options = ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    device = (ProcessGroupGloo.create_default_device() if bind_host is None
              else ProcessGroupGloo.create_device(hostname=bind_host))
    options._devices = [device]
    return ProcessGroupGloo(store, rank, size, options)


def _new_nccl_group(store: Store, rank: int, size: int, timeout_s: float) -> Backend:
    if not dist.is_nccl_available():
        raise ValueError("tensor/pipeline parallelism on CUDA needs a torch build with NCCL")
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = timedelta(seconds=max(timeout_s, _NCCL_WATCHDOG_MIN_S))
    return ProcessGroupNCCL(store, rank, size, options)


def kv_heads_of_rank(num_kv_heads: int, parallel: ParallelContext) -> tuple[int, int]:
    """(first KV head, KV head count) this tensor rank holds.

    tp <= num_kv_heads: a contiguous num_kv_heads / tp heads each. tp > num_kv_heads: one head
    each, replicated on tp / num_kv_heads consecutive ranks, so rank r holds head
    r // (tp / num_kv_heads) - the head its query heads (r's num_heads / tp consecutive ones)
    attend with under GQA.
    """
    tp, rank = parallel.tp_size, parallel.tp_rank
    if num_kv_heads % tp == 0:
        per_rank = num_kv_heads // tp
        return rank * per_rank, per_rank
    if tp % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) and tensor parallel size {tp} must "
                         "divide one another")
    return rank // (tp // num_kv_heads), 1


def check_layout(config, model_config) -> None:
    """An engine config's parallel layout fits the model and the machine (clear ValueErrors
    before any rank starts): head and layer divisibility, the pipeline split, GPUs per node."""
    par = config.parallel
    check_parallel_sizes(model_config, par.tensor_parallel_size, par.pipeline_parallel_size,
                         par.expert_parallel_size)
    split_layers(model_config.num_layers, par.pipeline_parallel_size, par.pipeline_layers)
    if config.device == "cuda" and par.world_size > torch.cuda.device_count():
        raise ValueError(f"tensor x pipeline parallel = {par.world_size} ranks, one GPU each, "
                         f"but this node has {torch.cuda.device_count()} GPUs")
