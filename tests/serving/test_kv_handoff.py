"""The prefill -> decode hand-off between real workers over a real Gloo pair channel, in one
process: the KV the decode side lands is byte-identical to what the prefill side computed, and
both pools are full again afterwards."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from decode_worker.worker import DecodeWorker
from engine.kv_cache.block_table import num_blocks_for
from engine.sampling_params import SamplingParams
from prefill_worker.worker import DecodePeer, PrefillWorker
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from tests.helpers import build_engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair(default_loaded):
    prefill_engine, decode_engine = build_engine(default_loaded), build_engine(default_loaded)
    outputs: queue.Queue = queue.Queue()
    decode = DecodeWorker(decode_engine, "decode-t", emit=outputs.put)
    # groups of 4 layers whatever their size (no byte minimum): 8 messages per transfer
    prefill = PrefillWorker(prefill_engine, "prefill-t", layers_per_message=4, min_message_bytes=0)
    accept = threading.Thread(target=decode.accept, args=("prefill-t", 0, "cpu"))
    accept.start()
    peer = DecodePeer(lambda d: decode.expect_transfer("prefill-t", d), decode.first_token)
    prefill.connect("decode-t", decode.endpoint("prefill-t", 0), peer, "cpu")
    accept.join(30)
    yield prefill, decode, outputs
    prefill.stop()
    decode.stop()


def _hand_off(prefill, decode, request_id: str, prompt: list[int], params: SamplingParams):
    sampling = sampling_to_proto(params)
    reply = decode.reserve(worker_pb2.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, num_prompt_tokens=len(prompt),
        prompt_token_ids=prompt, sampling=sampling, seed=7))
    assert reply.accepted, reply.reason
    results: queue.Queue = queue.Queue()
    prefill.submit(worker_pb2.PrefillTask(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, prompt_token_ids=prompt,
        sampling=sampling, seed=7, decode_instance_id="decode-t"), results.put)
    return results.get(timeout=60)


def _wait_idle(*workers, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [w.stats().state for w in workers]
        if all(s.free_kv_blocks == s.total_kv_blocks and not s.num_inflight_transfers for s in states):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {states}")


@pytest.mark.parametrize("prompt_len", [48, 37])  # ends exactly on a block boundary / mid-block
def test_landed_kv_is_byte_identical(pair, default_loaded, prompt_len):
    prefill, decode, _ = pair
    prompt = default_loaded.tokenizer.encode("Paged KV blocks travel between instances. " * 10)
    prompt = prompt[:prompt_len]
    # max_tokens=1: the request ends at the prefill, so the decode side only lands the KV and
    # frees its reservation, leaving the bytes in blocks 0..n-1 of both (fresh, FIFO) pools.
    result = _hand_off(prefill, decode, f"kv-{prompt_len}", prompt, SamplingParams(max_tokens=1))
    assert result.first_token.finish_reason == "length"
    _wait_idle(prefill, decode)
    n = num_blocks_for(prompt_len, 16)
    sent = prefill.engine.kv_cache[:, :n]
    landed = decode.engine.kv_cache[:, :n]
    assert sent.abs().sum() > 0
    assert torch.equal(sent, landed)
    assert decode.engine.kv_cache[:, n:].abs().sum() == 0  # nothing written elsewhere


def test_handoff_then_decode_streams_tokens(pair, default_loaded):
    prefill, decode, outputs = pair
    prompt = default_loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(max_tokens=12, temperature=0.0)
    result = _hand_off(prefill, decode, "stream", prompt, params)
    tokens = list(result.first_token.token_ids)
    deadline = time.monotonic() + 60
    finished = bool(result.first_token.finish_reason)
    while not finished and time.monotonic() < deadline:
        batch = outputs.get(timeout=60)
        for delta in batch.deltas:
            assert not delta.error, delta.error
            tokens += delta.token_ids
            finished = finished or bool(delta.finish_reason)
    reference = build_engine(default_loaded).generate([prompt], params)[0]
    assert tokens == reference.token_ids
    _wait_idle(prefill, decode)
