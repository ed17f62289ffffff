"""Conversions between the protobuf messages and the engine's own types, in one place."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import PROTOCOL_VERSION, generation_pb2, worker_pb2


def sampling_from_proto(p: generation_pb2.SamplingParams,
                        defaults: dict[str, object] | None = None) -> SamplingParams:
    """Engine SamplingParams from a proto; unset optional fields take `defaults`, then the
    engine's own defaults. Raises ValueError (naming the field) on bad values."""
    kwargs = dict(defaults or {})
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "seed", "ignore_eos", "logprobs", "speculative"):
        if p.HasField(name):
            kwargs[name] = getattr(p, name)
    if kwargs.get("top_k", 0) < 0:
        kwargs["top_k"] = 0  # the proto says <= 0 is off; SamplingParams accepts only 0 / -1
    return SamplingParams(stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), **kwargs)


def sampling_to_proto(s: SamplingParams) -> generation_pb2.SamplingParams:
    """A fully specified proto (every optional field set) for the workers."""
    p = generation_pb2.SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, repetition_penalty=s.repetition_penalty, stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos, logprobs=s.logprobs,
        speculative=s.speculative)
    if s.seed is not None:
        p.seed = s.seed
    return p


def worker_stats(engine, instance_id: str, role: int, num_inflight_transfers: int,
                 num_transfers_failed: int, address: str = "", device: str = "") -> worker_pb2.WorkerStats:
    """An instance's load and KV occupancy (engine thread only)."""
    stats = engine.stats()
    state = generation_pb2.InstanceState(
        instance_id=instance_id, role=role, address=address, device=device or engine.config.device,
        total_kv_blocks=stats.num_blocks, free_kv_blocks=stats.num_free_blocks,
        num_running_requests=stats.num_running, num_waiting_requests=stats.num_waiting,
        num_inflight_transfers=num_inflight_transfers,
        expert_token_counts=stats.expert_token_counts)
    return worker_pb2.WorkerStats(protocol_version=PROTOCOL_VERSION, state=state,
                                  kv_cache_usage=stats.kv_usage,
                                  num_preemptions=stats.num_preemptions,
                                  num_transfers_failed=num_transfers_failed)
