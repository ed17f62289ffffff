"""One transfer between two instances: a shard per rank pair of the plan, one outcome for all.

The transfer plan (planner.py) of the two layouts names every (prefill rank, decode rank, KV
shard) message; each goes over that rank pair's own channel (`rendezvous.rank_pair_key`),
described by `descriptors.shard_descriptor` of the one descriptor of the transfer. Each end
reports one outcome per transfer to its control plane only when every shard of the plan on its
side has reported (a rank may carry several shards, or none): OK when every shard landed (bytes
summed, the slowest shard's time), else the first failure. `ShardOutcomes` counts them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from protos.pdserve.v1 import worker_pb2

log = logging.getLogger(__name__)
SHARD_DONE = "shard_done"  # the event a rank service emits per shard (rank_calls.py)


class RankLostError(RuntimeError):
    """A rank of this multi-rank instance is gone: the instance fails as a whole."""


def shard_event(request_id: str, result: worker_pb2.TransferResult) -> dict:
    """A shard's outcome as a JSON-able event value."""
    return {"request_id": request_id, "result": result.SerializeToString().hex()}


def kv_digest(kv_cache, block_ids: list[int]) -> str:
    """sha256 of blocks `block_ids` of a cache, every layer (a rank's shard as it holds it):
    lets two instances compare what each rank sent and received without moving the bytes."""
    import hashlib

    import torch

    blocks = kv_cache[:, torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)]
    return hashlib.sha256(blocks.contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def instance_kv_digests(engine, block_ids: list[int], timeout_s: float = 30.0) -> list[str]:
    """`kv_digest` of every rank of an instance, rank 0 first (the others through their rank
    services' `kv_digest` call): diagnostics, and how tests compare what moved."""
    digests = [kv_digest(engine.kv_cache, block_ids)]
    if engine.rank_caller is not None:
        others = engine.rank_caller.call("kv_digest", (block_ids,), timeout_s=timeout_s)
        digests += [others[rank] for rank in sorted(others)]
    return digests


def kv_blocks_hex(kv_cache, block_ids: list[int]) -> dict:
    """Blocks `block_ids` of a rank's cache as JSON (dtype, shape, bytes in hex): how a test
    reads what a rank holds to compare it with a slice of another instance's KV. Diagnostics
    only: meant for tiny models."""
    import torch

    blocks = kv_cache[:, torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)]
    raw = blocks.contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return {"dtype": str(blocks.dtype).removeprefix("torch."), "shape": list(blocks.shape),
            "hex": raw.hex()}


def kv_blocks_from_hex(value: dict):
    import torch

    raw = bytearray(bytes.fromhex(value["hex"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, value["dtype"]))
    return flat.reshape(value["shape"])


def instance_kv_blocks_hex(engine, block_ids: list[int], timeout_s: float = 30.0) -> list[dict]:
    """`kv_blocks_hex` of every rank of an instance, rank 0 first (the others through their
    rank services' `kv_blocks` call)."""
    values = [kv_blocks_hex(engine.kv_cache, block_ids)]
    if engine.rank_caller is not None:
        others = engine.rank_caller.call("kv_blocks", (block_ids,), timeout_s=timeout_s)
        values += [others[rank] for rank in sorted(others)]
    return values


def instance_kv_blocks(engine, block_ids: list[int], timeout_s: float = 30.0) -> list:
    """The blocks `block_ids` of every rank of an instance (tensors, rank 0 first)."""
    return [kv_blocks_from_hex(v) for v in instance_kv_blocks_hex(engine, block_ids, timeout_s)]


OutcomeCallback = Callable[[str, worker_pb2.TransferResult], None]


class InstanceTransfers:
    """One end of an instance's transfers: rank 0's own shard outcomes (its links' callback,
    `rank0_done`) and, for a multi-rank instance, every other rank's (events from `ranks`, a
    RankCaller), combined into one `on_outcome` per transfer once every shard the plan expects
    has reported. A rank that is gone kills the instance's engine loop (`loop.submit` of a
    raising command), as a failed step would."""

    def __init__(self, ranks, world_size: int, on_outcome: OutcomeCallback, loop,
                 instance: str) -> None:
        self._ranks = ranks
        self._outcomes = ShardOutcomes(world_size)
        self._on_outcome = on_outcome
        self._loop = loop
        self._instance = instance
        if ranks is not None:
            _watch_ranks(ranks, self._outcomes, on_outcome, self._lost)

    def begin(self, request_id: str, expected: dict[int, int] | None = None) -> None:
        """Await `expected[rank]` shard outcomes from each rank (default: one per rank)."""
        self._outcomes.begin(request_id, expected)

    def forget(self, request_id: str) -> None:
        self._outcomes.forget(request_id)

    def rank0_done(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        combined = self._outcomes.report(request_id, 0, result)
        if combined is not None:  # else other shards still to report
            self._on_outcome(request_id, combined)

    def _lost(self, rank: int) -> None:
        message = f"rank {rank} of {self._instance} is gone"

        def fail() -> None:
            raise RankLostError(message)
        self._loop.submit(fail)


def _watch_ranks(ranks, outcomes: ShardOutcomes, on_outcome: OutcomeCallback,
                 on_lost: Callable[[int], None]) -> None:
    """Route the other ranks' shard outcomes into `outcomes` (`on_outcome` gets each
    transfer's combined result) and a lost rank to `on_lost` (`ranks`: a RankCaller)."""
    def on_event(rank: int, name: str, value) -> None:
        if name != SHARD_DONE:
            log.warning("rank %d: %s: %s", rank, name, value)
            return
        result = worker_pb2.TransferResult.FromString(bytes.fromhex(value["result"]))
        combined = outcomes.report(value["request_id"], rank, result)
        if combined is not None:
            on_outcome(value["request_id"], combined)

    ranks.set_event_handler(on_event)
    ranks.add_lost_handler(on_lost)


@dataclass(slots=True)
class _Collecting:
    waiting: dict[int, int]  # rank -> shard outcomes still to come from it
    results: list[worker_pb2.TransferResult] = field(default_factory=list)


class ShardOutcomes:
    """Per-shard transfer results of one end of one instance, combined per request."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._lock = threading.Lock()
        self._collecting: dict[str, _Collecting] = {}

    def begin(self, request_id: str, expected: dict[int, int] | None = None) -> None:
        """`expected[rank]` shards of `request_id`'s transfer will report from each rank
        (default: one from every rank)."""
        expected = expected or {rank: 1 for rank in range(self.world_size)}
        bad = {r: n for r, n in expected.items() if not 0 <= r < self.world_size or n < 1}
        if bad or not expected:
            raise ValueError(f"expected shard outcomes {expected} must name ranks of "
                             f"0..{self.world_size - 1}, each >= 1")
        with self._lock:
            self._collecting[request_id] = _Collecting(dict(expected))

    def report(self, request_id: str, rank: int,
               result: worker_pb2.TransferResult) -> worker_pb2.TransferResult | None:
        """One of rank `rank`'s shard results; the combined result once it was the last one,
        else None."""
        with self._lock:
            collecting = self._collecting.get(request_id)
            if collecting is None or not collecting.waiting.get(rank):
                return None  # not begun here, or more than the plan expects
            collecting.waiting[rank] -= 1
            if not collecting.waiting[rank]:
                del collecting.waiting[rank]
            collecting.results.append(result)
            if collecting.waiting:
                return None
            del self._collecting[request_id]
        return combine(collecting.results)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._collecting.pop(request_id, None)


def combine(results: list[worker_pb2.TransferResult]) -> worker_pb2.TransferResult:
    """OK if every shard is OK (bytes summed, the longest times), else the first failure."""
    failed = [r for r in results if r.status != worker_pb2.TRANSFER_STATUS_OK]
    if failed:
        return failed[0]
    combined = worker_pb2.TransferResult()
    combined.CopyFrom(results[0])
    combined.num_bytes = sum(r.num_bytes for r in results)
    combined.duration_s = max(r.duration_s for r in results)
    combined.tail_s = max(r.tail_s for r in results)
    return combined


def collect_links(built: dict, others=None) -> dict:
    """Every future's link ({key: link}; `others`: a future of the other ranks' side), after all
    of them finished; the first error is raised only then, with the links that were built
    closed (nothing is left half-paired)."""
    results, errors = {}, []
    for key, future in built.items():
        try:
            results[key] = future.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
    if others is not None:
        try:
            others.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
    if errors:
        for link in results.values():
            link.close()
        raise errors[0]
    return results
