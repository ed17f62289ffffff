"""One rank of a multi-rank instance: its slice of the model, its KV cache, its model runner.

Every rank of an instance (rank 0 in the engine core's process, the others in their own
processes, `rank_main`) builds itself the same way: join the instance's process groups, load its
slice of the weights, agree with the other ranks on the number of KV blocks (the minimum of
what fits on each, so one block id names the same block everywhere), then run plans.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch._C._distributed_c10d import AllreduceOptions, ReduceOp, TCPStore

from engine.attention import get_backend
from engine.builder import load_model, make_kv_cache, num_kv_blocks_that_fit
from engine.config import EngineConfig
from engine.executor.plan_channel import PlanReceiver
from engine.executor.rank_calls import (RankCall, RankContext, RankService, ServiceFactory,
                                        encode_event, encode_reply, layout_name)
from engine.loader.source import open_model
from engine.model_runner import ModelRunner
from engine.parallel import ParallelContext, init_parallel_context

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What a rank process needs to join its instance (picklable: passed at spawn)."""

    config: EngineConfig
    rank: int
    store_host: str
    store_port: int
    plan_address: tuple[str, int]
    authkey: bytes
    max_model_len: int
    service: ServiceFactory | None = None  # per-rank state of a feature (rank_calls.py)


@dataclass(slots=True)
class Rank:
    """A built rank: the runner that executes plans, and what it was built from."""

    parallel: ParallelContext
    runner: ModelRunner
    kv_cache: torch.Tensor
    loaded: object  # engine.builder.LoadedModel of this rank's slice


def connect_store(host: str, port: int, is_master: bool, world_size: int,
                  timeout_s: float) -> TCPStore:
    return TCPStore(host, port, world_size, is_master, timedelta(seconds=timeout_s),
                    wait_for_workers=False)


def build_rank(config: EngineConfig, store: TCPStore, rank: int, max_model_len: int) -> Rank:
    """Join the groups, load this rank's weights, size the KV cache with the other ranks."""
    par = config.parallel
    if config.device == "cuda":  # one GPU per rank of this node
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:  # ranks computing at once must not oversubscribe the cores (spinning thread pools)
        fair_share = max(1, (os.cpu_count() or 1) // par.world_size)
        torch.set_num_threads(min(torch.get_num_threads(), fair_share))
    model_config = open_model(config.model).config
    parallel = init_parallel_context(store, rank, par.tensor_parallel_size,
                                     par.pipeline_parallel_size, model_config.num_layers,
                                     config.device, par.collective_timeout_s, par.pipeline_layers,
                                     ep_size=par.expert_parallel_size)
    loaded = load_model(config, parallel)
    fits = num_kv_blocks_that_fit(loaded.config, config, parallel)
    num_blocks = agree_min(parallel, fits, config.device)
    kv_cache = make_kv_cache(loaded.config, config, parallel, num_blocks)
    backend = get_backend(config.attention_backend, config.device)
    # CUDA graphs only for one rank for now: capturing NCCL collectives is untested here
    runner = ModelRunner(loaded.model, kv_cache, backend, config.cache.block_size,
                         loaded.config.vocab_size, config.device, use_cuda_graphs=False,
                         max_model_len=max_model_len,
                         max_num_seqs=config.scheduler.max_num_seqs, parallel=parallel)
    return Rank(parallel, runner, kv_cache, loaded)


def agree_min(parallel: ParallelContext, value: int, device: str) -> int:
    """The minimum of `value` over every rank of the instance."""
    group = parallel.world_group
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    options = AllreduceOptions()
    options.reduceOp = ReduceOp.MIN
    work = group.allreduce([tensor], options)
    if parallel.is_nccl:
        work.wait()
    else:
        work.wait(timedelta(seconds=parallel.timeout_s))
    return int(tensor.item())


def rank_main(spec: RankSpec) -> None:
    """A rank process (not rank 0): build, then run every plan and call rank 0 sends until it
    says stop or goes away. A failure here exits the process; rank 0 sees its socket close
    and fails the whole instance."""
    logging.basicConfig(level=logging.WARNING)
    timeout_s = spec.config.parallel.collective_timeout_s
    receiver = PlanReceiver(spec.plan_address, spec.authkey, timeout_s, spec.rank)
    store = connect_store(spec.store_host, spec.store_port, False,
                          spec.config.parallel.world_size, timeout_s)
    rank = build_rank(spec.config, store, spec.rank, spec.max_model_len)
    service = _start_service(spec, rank, receiver)
    calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"rank{spec.rank}-call")
    try:
        while (message := receiver.recv()) is not None:
            if isinstance(message, RankCall):
                if message.inline:
                    _answer(service, message, receiver, spec.rank)
                else:
                    calls.submit(_answer, service, message, receiver, spec.rank)
                continue
            listener = service.layer_listener() if service is not None else None
            rank.runner.execute(message, listener)
            if service is not None:
                service.after_plan()
    except EOFError:
        log.warning("rank %d: rank 0 is gone; exiting", spec.rank)
    finally:
        calls.shutdown(wait=False, cancel_futures=True)
        if service is not None:
            service.close()
        receiver.close()


def _start_service(spec: RankSpec, rank: Rank, receiver: PlanReceiver) -> RankService | None:
    if spec.service is None:
        return None
    par = spec.config.parallel

    def emit(name: str, value) -> None:
        receiver.send_back(encode_event(spec.rank, name, value))
    context = RankContext(spec.rank, par.world_size, rank.parallel.tp_rank,
                          rank.parallel.pp_rank, rank.kv_cache, rank.loaded.config.name,
                          layout_name(par.tensor_parallel_size, par.pipeline_parallel_size),
                          emit)
    return spec.service(context)


def _answer(service: RankService | None, call: RankCall, receiver: PlanReceiver,
            rank: int) -> None:
    """Run one call on this rank's service; a reply if one is wanted (errors as events else)."""
    try:
        if service is None:
            raise RuntimeError(f"rank {rank} has no service for {call.name!r}")
        value, error = service.call(call.name, call.args), ""
    except Exception as exc:  # noqa: BLE001 - the error goes back to rank 0
        log.exception("rank %d: %s failed", rank, call.name)
        value, error = None, f"{type(exc).__name__}: {exc}"
    if call.call_id:
        receiver.send_back(encode_reply(call.call_id, rank, value, error))
    elif error:
        receiver.send_back(encode_event(rank, "error", f"{call.name}: {error}"))


def main() -> None:
    """`python -m engine.executor.rank`: the spec arrives pickled on stdin (the secret in it
    never shows in a process listing)."""
    rank_main(pickle.loads(sys.stdin.buffer.read()))


if __name__ == "__main__":
    main()
