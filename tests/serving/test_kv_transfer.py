"""The prefill -> decode KV hand-off over real Gloo pair channels between spawned processes.

One decode process and two prefill processes live for the whole module; each test drives them
with steps (plain functions below, run in a worker with its per-process state). Every step and
every wait is bounded, so a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kv_transfer import (
    ChannelConfig,
    FaultInjection,
    KVLayoutSpec,
    KVReceiver,
    KVSender,
    KVTransferConnectionError,
    KVTransferError,
    KVTransferIncompatibleError,
    PairChannel,
    PairRole,
    check_compatible,
    compat_hash,
    host_store,
    join_store,
    layers_per_message_for,
    new_descriptor,
    pack_blocks,
    pair_key,
    unpack_blocks,
)
from protos.pdserve.v1 import worker_pb2
from tests.serving.step_workers import Outcome, Worker, all_ok, together

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 24, 4, 2, 8
DTYPE = torch.bfloat16
DECODE_SEED = 100
HOST = "127.0.0.1"


def make_cache(seed: int) -> torch.Tensor:
    shape = (NUM_LAYERS, NUM_BLOCKS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def make_spec(block_size: int = BLOCK_SIZE) -> KVLayoutSpec:
    return KVLayoutSpec("tiny-llama", "bfloat16", block_size, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM)


@dataclass(frozen=True)
class Plan:
    """One transfer as both ends see it: the descriptor plus each side's block ids."""

    request_id: str
    pair_seq: int
    src_block_ids: list[int]
    dst_block_ids: list[int]
    layers_per_message: int

    def descriptor(self, key: str) -> worker_pb2.TransferDescriptor:
        num_blocks = len(self.src_block_ids)
        return new_descriptor(key, self.pair_seq, self.request_id, num_blocks * BLOCK_SIZE - 1,
                              num_blocks, (0, NUM_LAYERS), self.layers_per_message)


def make_plans(first_seq: int, layers_per_message: list[int], seed: int) -> list[Plan]:
    generator = torch.Generator().manual_seed(seed)
    plans = []
    for offset, per_message in enumerate(layers_per_message):
        src, dst = (torch.randperm(NUM_BLOCKS, generator=generator)[:5].tolist() for _ in "sd")
        plans.append(Plan(f"req-{seed}-{offset}", first_seq + offset, src, dst, per_message))
    return plans


# ---- steps, run inside the worker processes (state: that process's dict) ----

def step_host_store(state: dict) -> int:
    state["store"] = host_store(HOST, 0, timeout_s=10)
    state["cache"] = make_cache(DECODE_SEED)
    return state["store"].port


def step_connect(state: dict, key: str, role: PairRole, port: int, block_size: int = BLOCK_SIZE,
                 faults: FaultInjection = FaultInjection()) -> str:
    state.setdefault("cache", make_cache(state["seed"]))
    state.setdefault("store", join_store(HOST, port, timeout_s=10))  # decode: its own host_store
    config = ChannelConfig(key, role, instance_id=f"{role.name}-{os.getpid()}",
                           connect_timeout_s=10, bind_host=HOST)
    channel = PairChannel.connect(state["store"], config, make_spec(block_size))
    endpoint = KVSender(channel, faults) if role is PairRole.PREFILL else KVReceiver(channel)
    state.setdefault("pairs", {})[key] = (channel, endpoint)
    return channel.backend


def step_send(state: dict, key: str, plans: list[Plan], timeout_s: float) -> list[dict]:
    """Open every plan's transfer (a batch), report layers one by one, then finish each."""
    sender = state["pairs"][key][1]
    transfers = [sender.begin(plan.descriptor(key), state["cache"], plan.src_block_ids)
                 for plan in plans]
    for layer in range(NUM_LAYERS):
        sender.send_layers(layer, layer + 1)
    return [_summary(sender.finish(transfer, timeout_s)) for transfer in transfers]


def step_receive(state: dict, key: str, plans: list[Plan], sender_seed: int,
                 timeout_s: float) -> list[dict]:
    receiver, cache = state["pairs"][key][1], state["cache"]
    sent = make_cache(sender_seed)
    summaries = []
    for plan in plans:
        before = cache.clone()
        result = receiver.receive(plan.descriptor(key), cache, plan.dst_block_ids, timeout_s)
        others = [b for b in range(NUM_BLOCKS) if b not in plan.dst_block_ids]
        summaries.append(_summary(result) | {
            "blocks_equal": torch.equal(cache[:, plan.dst_block_ids], sent[:, plan.src_block_ids]),
            "others_untouched": torch.equal(cache[:, others], before[:, others]),
        })
    return summaries


def step_close(state: dict, key: str) -> str:
    channel = state["pairs"].pop(key)[0]
    channel.close()
    return channel.state.value


def step_die_mid_transfer(state: dict, key: str, plan: Plan) -> None:
    sender = state["pairs"][key][1]
    sender.begin(plan.descriptor(key), state["cache"], plan.src_block_ids)
    sender.send_layers(0, 1)
    time.sleep(0.2)
    os._exit(3)


def step_send_to_gone_peer(state: dict, key: str, plans: list[Plan], timeout_s: float) -> str:
    """Like step_send, but the peer has closed: posting must not raise (it runs inside the
    prefill's forward pass); finish() reports the failure."""
    sender = state["pairs"][key][1]
    transfers, errors = [], []
    for plan in plans:
        time.sleep(0.5)  # the peer's close has reached this end's sockets
        try:  # begin() refuses once the channel knows it is broken (outside the forward)
            transfers.append(sender.begin(plan.descriptor(key), state["cache"],
                                          plan.src_block_ids))
        except KVTransferConnectionError:
            errors.append("begin:KVTransferConnectionError")
        for layer in range(NUM_LAYERS):
            sender.send_layers(layer, layer + 1)
    for transfer in transfers:
        try:
            sender.finish(transfer, timeout_s)
        except KVTransferError as exc:
            errors.append(type(exc).__name__)
    return ",".join(errors)


def _summary(result: worker_pb2.TransferResult) -> dict:
    return {"status": worker_pb2.TransferStatus.Name(result.status),
            "num_bytes": result.num_bytes, "duration_s": result.duration_s,
            "tail_s": result.tail_s}


@dataclass
class Cluster:
    decode: Worker
    prefill_a: Worker
    prefill_b: Worker
    store_port: int

    def connect(self, prefill: Worker, key: str, **prefill_kwargs: Any) -> list[Outcome]:
        return together(
            (self.decode, step_connect, {"key": key, "role": PairRole.DECODE,
                                         "port": self.store_port}),
            (prefill, step_connect, {"key": key, "role": PairRole.PREFILL,
                                     "port": self.store_port, **prefill_kwargs}),
        )

    def transfer(self, prefill: Worker, key: str, plans: list[Plan],
                 receive_timeout_s: float = 10, send_timeout_s: float = 10) -> list[Outcome]:
        return together(
            (self.decode, step_receive, {"key": key, "plans": plans, "sender_seed": prefill.seed,
                                         "timeout_s": receive_timeout_s}),
            (prefill, step_send, {"key": key, "plans": plans, "timeout_s": send_timeout_s}),
        )


@pytest.fixture(scope="module")
def cluster():
    context = mp.get_context("spawn")
    workers = [Worker(context, seed) for seed in (DECODE_SEED, 1, 2)]
    try:
        port = workers[0].run(step_host_store)
        yield Cluster(*workers, store_port=port)
    finally:
        for worker in workers:
            worker.stop()


# ---- in-process ----

@pytest.mark.parametrize(("layer_bytes", "min_layers", "min_bytes", "expected"), [
    (72 << 10, 1, 0, 1),  # no byte minimum: layers_per_message alone
    (2 << 20, 1, 32 << 20, 16),  # a 512-token Llama-3-8B prompt: 2 MiB a layer
    (8 << 20, 1, 32 << 20, 4),  # 2k tokens
    (32 << 20, 1, 32 << 20, 1),  # 8k tokens: layer by layer
    (1 << 10, 1, 32 << 20, 32),  # tiny: the whole KV in one message
    (32 << 20, 4, 32 << 20, 4),  # layers_per_message is a floor
])
def test_layers_per_message_reaches_the_byte_minimum(layer_bytes, min_layers, min_bytes, expected):
    assert layers_per_message_for(32, layer_bytes, min_layers, min_bytes) == expected
    with pytest.raises(ValueError, match="min_message_bytes"):
        layers_per_message_for(32, layer_bytes, min_layers, -1)


def test_send_layers_posts_only_when_a_group_is_complete():
    from kv_transfer.sender import OutgoingTransfer, _group_ready

    desc = new_descriptor("k", 0, "r", 10, 3, (0, 8), 4)
    transfer = OutgoingTransfer(desc, make_cache(0), torch.arange(3), [(0, 4), (4, 8)], 0.0,
                                ready_until=0)
    readiness = []
    for layer in range(8):
        transfer.ready_until = layer + 1
        readiness.append(_group_ready(transfer))
        if readiness[-1]:
            transfer.next_group += 1  # what the pump does when it posts the group
    assert readiness == [False, False, False, True, False, False, False, True]


def test_pack_unpack_round_trip_into_other_block_ids():
    source, target = make_cache(1), make_cache(2)
    before = target.clone()
    src_ids, dst_ids = torch.tensor([3, 7, 1, 20]), torch.tensor([0, 5, 9, 11])
    for layers in (slice(0, 1), slice(1, 4)):
        packed = pack_blocks(source, src_ids, layers)
        assert packed.is_contiguous()
        assert packed.shape == (layers.stop - layers.start, 4, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        unpack_blocks(target, dst_ids, layers, packed)
    assert torch.equal(target[:, dst_ids], source[:, src_ids])
    others = [b for b in range(NUM_BLOCKS) if b not in dst_ids.tolist()]
    assert torch.equal(target[:, others], before[:, others])
    out = torch.empty_like(pack_blocks(source, src_ids, slice(0, 2)))
    assert pack_blocks(source, src_ids, slice(0, 2), out=out) is out
    with pytest.raises(ValueError, match="int64"):
        pack_blocks(source, src_ids.int(), slice(0, 2))
    with pytest.raises(ValueError, match="shape"):
        unpack_blocks(target, dst_ids, slice(0, 1), out)


def test_compat_hash_and_check_name_every_difference():
    spec = make_spec()
    assert compat_hash(spec) == compat_hash(make_spec())
    assert compat_hash(spec) != compat_hash(make_spec(block_size=16))
    assert KVLayoutSpec.for_cache(make_cache(0), "tiny-llama") == spec
    other = KVLayoutSpec("tiny-llama", "float16", 16, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM)
    with pytest.raises(KVTransferIncompatibleError, match="dtype.*block_size"):
        check_compatible(spec, other)


def test_nccl_channels_require_eager_module_loading(monkeypatch):
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    with pytest.raises(ValueError, match="CUDA_MODULE_LOADING=EAGER"):
        ChannelConfig("p->d@g0", PairRole.DECODE, device="cuda:0")
    monkeypatch.setenv("CUDA_MODULE_LOADING", "EAGER")
    assert ChannelConfig("p->d@g0", PairRole.DECODE, device="cuda:0").device == "cuda:0"


def test_sender_refuses_misuse_and_its_abort_fails_the_peer():
    store = host_store(HOST, 0, timeout_s=5)
    configs = [ChannelConfig("misuse", role, connect_timeout_s=5, bind_host=HOST)
               for role in PairRole]
    with ThreadPoolExecutor(2) as pool:  # both ends in this process (and store), one thread each
        prefill, decode = pool.map(lambda c: PairChannel.connect(store, c, make_spec()), configs)
    sender, plan = KVSender(prefill), make_plans(0, [1], seed=60)[0]
    with pytest.raises(ValueError, match="out of order"):
        sender.begin(make_plans(1, [1], seed=60)[0].descriptor("misuse"), make_cache(0),
                     plan.src_block_ids)
    transfer = sender.begin(plan.descriptor("misuse"), make_cache(0), plan.src_block_ids)
    with pytest.raises(ValueError, match="skips layers"):
        sender.send_layers(2, 3)
    with pytest.raises(ValueError, match="before send_layers"):
        sender.finish(transfer, timeout_s=1)
    sender.abort("test gives up")
    with pytest.raises(KVTransferConnectionError, match="closed by peer"):
        KVReceiver(decode).receive(plan.descriptor("misuse"), make_cache(1),
                                   plan.dst_block_ids, timeout_s=5)
    decode.close()


# ---- across processes ----

def test_sequential_layerwise_and_grouped_transfers_are_byte_identical(cluster):
    key = pair_key("prefill-a", "decode", 0)
    assert all_ok(cluster.connect(cluster.prefill_a, key)) == ["gloo", "gloo"]
    batch = make_plans(0, [1, 1], seed=10)  # two requests of one prefill batch, layer by layer
    grouped = make_plans(2, [3, 4], seed=11)  # 3 + 1 layers, then all 4 in one message
    for plans in (batch, grouped[:1], grouped[1:]):
        received, sent = all_ok(cluster.transfer(cluster.prefill_a, key, plans))
        for summary in received:
            assert summary["status"] == "TRANSFER_STATUS_OK"
            assert summary["blocks_equal"] and summary["others_untouched"]
        bytes_per_transfer = NUM_LAYERS * 5 * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2
        assert [s["num_bytes"] for s in sent] == [bytes_per_transfer] * len(plans)
        assert [s["status"] for s in sent] == ["TRANSFER_STATUS_OK"] * len(plans)
        assert all(0 < s["tail_s"] <= s["duration_s"] for s in sent)


def test_handshake_mismatch_fails_both_ends_quickly(cluster):
    key = pair_key("prefill-b", "decode", 0)
    decode, prefill = cluster.connect(cluster.prefill_b, key, block_size=2 * BLOCK_SIZE)
    for outcome in (decode, prefill):
        assert outcome.kind == "KVTransferIncompatibleError", outcome.value
        assert "block_size" in outcome.value
        assert outcome.elapsed_s < 5


def test_stalled_sender_times_out_receiver_and_a_new_generation_works(cluster):
    stalled = pair_key("prefill-a", "decode", 1)
    all_ok(cluster.connect(cluster.prefill_a, stalled, faults=FaultInjection(drop_after_layers=1)))
    receive_timeout_s = 1.0
    received, sent = cluster.transfer(cluster.prefill_a, stalled, make_plans(0, [1], seed=20),
                                      receive_timeout_s=receive_timeout_s, send_timeout_s=10)
    assert received.kind == "KVTransferTimeoutError", received.value
    assert receive_timeout_s <= received.elapsed_s < receive_timeout_s + 1.5
    assert sent.kind in ("KVTransferConnectionError", "KVTransferTimeoutError"), sent.value
    assert sent.elapsed_s < receive_timeout_s + 2  # the receiver's abort reaches the sender
    fresh = pair_key("prefill-a", "decode", 2)
    all_ok(cluster.connect(cluster.prefill_a, fresh))
    received, _ = all_ok(cluster.transfer(cluster.prefill_a, fresh, make_plans(0, [2], seed=21)))
    assert received[0]["blocks_equal"]


def test_slow_link_fails_both_ends_with_typed_errors(cluster):
    key = pair_key("prefill-b", "decode", 3)
    all_ok(cluster.connect(cluster.prefill_b, key, faults=FaultInjection(delay_s=0.6)))
    received, sent = cluster.transfer(cluster.prefill_b, key, make_plans(0, [1], seed=25),
                                      receive_timeout_s=1.0, send_timeout_s=10)
    assert received.kind == "KVTransferTimeoutError", received.value
    assert received.elapsed_s < 2.5
    assert sent.kind in ("KVTransferConnectionError", "KVTransferTimeoutError"), sent.value
    assert sent.elapsed_s < 3


def test_corrupt_header_is_a_protocol_error_on_both_ends(cluster):
    key = pair_key("prefill-b", "decode", 1)
    all_ok(cluster.connect(cluster.prefill_b, key, faults=FaultInjection(corrupt_header=True)))
    received, sent = cluster.transfer(cluster.prefill_b, key, make_plans(0, [2], seed=30))
    assert received.kind == "KVTransferProtocolError" and "request_hash" in received.value
    assert sent.kind == "KVTransferProtocolError", sent.value
    assert received.elapsed_s < 3 and sent.elapsed_s < 3


def test_two_pairs_on_one_decode_process_are_independent(cluster):
    key_a, key_b = pair_key("prefill-a", "decode", 3), pair_key("prefill-b", "decode", 2)
    all_ok(cluster.connect(cluster.prefill_a, key_a))
    all_ok(cluster.connect(cluster.prefill_b, key_b))
    all_ok(cluster.transfer(cluster.prefill_a, key_a, make_plans(0, [1], seed=40)))
    all_ok(cluster.transfer(cluster.prefill_b, key_b, make_plans(0, [2], seed=41)))
    assert all_ok(together((cluster.decode, step_close, {"key": key_a}),
                           (cluster.prefill_a, step_close, {"key": key_a}))) == ["closed"] * 2
    received, _ = all_ok(cluster.transfer(cluster.prefill_b, key_b, make_plans(1, [4], seed=42)))
    assert received[0]["blocks_equal"] and received[0]["others_untouched"]


def test_posting_to_a_closed_peer_fails_the_transfer_not_the_step(cluster):
    key = pair_key("prefill-a", "decode", 7)
    all_ok(cluster.connect(cluster.prefill_a, key))
    all_ok(together((cluster.decode, step_close, {"key": key})))
    sent = cluster.prefill_a.run(step_send_to_gone_peer, key=key,
                                 plans=make_plans(0, [1, 1, 1], seed=60), timeout_s=3)
    kinds = sent.split(",")
    assert len(kinds) == 3 and all("KVTransfer" in kind for kind in kinds), sent


def test_sender_process_death_fails_the_receiver_fast():
    context = mp.get_context("spawn")
    decode, prefill = Worker(context, DECODE_SEED), Worker(context, 7)
    try:
        port = decode.run(step_host_store)
        cluster = Cluster(decode, prefill, prefill, port)
        key = pair_key("prefill-doomed", "decode", 0)
        all_ok(cluster.connect(prefill, key))
        plan = make_plans(0, [1], seed=50)[0]
        decode.submit(step_receive, key=key, plans=[plan], sender_seed=7, timeout_s=20)
        prefill.submit(step_die_mid_transfer, key=key, plan=plan)
        received = decode.outcome()
        assert received.kind == "KVTransferConnectionError", received.value
        assert received.elapsed_s < 5  # noticed from the closed socket, not the 20 s timeout
    finally:
        decode.stop()
        prefill.stop()
