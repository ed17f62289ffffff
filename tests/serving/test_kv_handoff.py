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
from kv_transfer import new_descriptor
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


def _hand_off(prefill, decode, request_id: str, prompt: list[int], params: SamplingParams,
              output_token_ids: list[int] = ()):
    """Reserve, prefill and hand off one request (resumed after `output_token_ids` if any)."""
    sampling = sampling_to_proto(params)
    reply = decode.reserve(worker_pb2.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, num_prompt_tokens=len(prompt),
        prompt_token_ids=prompt, sampling=sampling, seed=7, output_token_ids=output_token_ids))
    assert reply.accepted, reply.reason
    results: queue.Queue = queue.Queue()
    prefill.submit(worker_pb2.PrefillTask(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, prompt_token_ids=prompt,
        sampling=sampling, seed=7, decode_instance_id="decode-t",
        output_token_ids=output_token_ids,
        num_decode_cached_tokens=reply.num_cached_tokens), results.put)  # as the router does
    return results.get(timeout=60)


def _stream(outputs: queue.Queue, result) -> list[worker_pb2.TokenDelta]:
    """The first token's delta and every decode delta of one request, up to its last."""
    deltas = [result.first_token]
    deadline = time.monotonic() + 60
    while not deltas[-1].finish_reason and time.monotonic() < deadline:
        for delta in outputs.get(timeout=60).deltas:
            assert not delta.error, delta.error
            deltas.append(delta)
    assert deltas[-1].finish_reason, "the stream did not finish"
    return deltas


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
    tokens = [t for delta in _stream(outputs, result) for t in delta.token_ids]
    reference = build_engine(default_loaded).generate([prompt], params)[0]
    assert tokens == reference.token_ids
    _wait_idle(prefill, decode)


def test_resumed_request_continues_the_uninterrupted_stream(pair, default_loaded):
    # A migrated request: re-prefilled from prompt + the tokens its client already has, its KV
    # handed off, decoded on: token for token (sampled, not greedy) and text as uninterrupted.
    prefill, decode, outputs = pair
    prompt = default_loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea."}])
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, ignore_eos=True)
    full = _stream(outputs, _hand_off(prefill, decode, "full", prompt, params))
    assert [len(d.token_ids) for d in full] == [1] * 24  # one token per delta: texts per token
    tokens = [d.token_ids[0] for d in full]
    text = "".join(d.text for d in full)
    assert num_blocks_for(len(prompt) + 17, 16) > num_blocks_for(len(prompt), 16)
    for k in (1, 17, 23):  # 17: the resumed outputs need a block the prompt alone does not
        result = _hand_off(prefill, decode, f"resumed-{k}", prompt, params, tokens[:k])
        assert result.transfer.status == worker_pb2.TRANSFER_STATUS_OK
        resumed = _stream(outputs, result)
        assert [t for d in resumed for t in d.token_ids] == tokens[k:], f"cut {k}"
        emitted = "".join(d.text for d in full[:k])
        assert "".join(d.text for d in resumed) == text[len(emitted):], f"cut {k}"
        assert resumed[-1].finish_reason == "length"
        assert resumed[-1].usage.completion_tokens == 24
        assert resumed[-1].usage.prompt_tokens == len(prompt)
    _wait_idle(prefill, decode)


def test_resumed_outputs_that_had_ended_the_request_are_refused(pair, default_loaded):
    prefill, decode, _ = pair
    tok = default_loaded.tokenizer
    prompt, outputs = tok.encode("Say hello."), tok.encode(" Hello there, friend")
    sampling = sampling_to_proto(SamplingParams(max_tokens=len(outputs)))
    reply = decode.reserve(worker_pb2.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id="done", prompt_token_ids=prompt,
        sampling=sampling, seed=7, output_token_ids=outputs))
    assert not reply.accepted
    assert reply.reason == f"{len(outputs)} output tokens already reach max_tokens " \
                           f"{len(outputs)}: the request had already finished"
    # A stop string among them is found by the prefill (it replays the text); the router then
    # aborts the reservation, as for any prefill failure.
    params = SamplingParams(max_tokens=32, stop=[tok.decode(outputs)[-6:]])
    result = _hand_off(prefill, decode, "stopped", prompt, params, outputs)
    assert result.first_token.error == (f"output_token_ids[:{len(outputs)}] complete a stop "
                                        "string: the request had already finished")
    assert decode.abort(worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION,
                                             request_id="stopped")).found
    _wait_idle(prefill, decode)


def test_link_replaced_during_the_step_fails_the_handoff_and_frees_its_blocks(pair,
                                                                              default_loaded):
    # A repair (a new channel generation) may close the link while the step that began a
    # transfer on it still runs: the hand-off is refused, reported failed, and its prefill
    # blocks come back at once (they used to stay with a transfer no finisher would ever see).
    prefill, decode, _ = pair
    execute = prefill.engine.runner.execute

    def execute_then_close(*args, **kwargs):
        sampled = execute(*args, **kwargs)
        prefill.links["decode-t"].close()  # what connect() does to the old generation
        return sampled

    prefill.engine.runner.execute = execute_then_close
    prompt = default_loaded.tokenizer.encode("A link replaced mid-step.")
    result = _hand_off(prefill, decode, "replaced", prompt, SamplingParams(max_tokens=8))
    assert result.transfer.status == worker_pb2.TRANSFER_STATUS_FAILED
    assert result.transfer.message == "no ready KV channel to decode-t"
    assert not prefill.abort("replaced").transfer_begun
    decode.abort(worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION, request_id="replaced",
                                      transfer_begun=False))
    _wait_idle(prefill, decode)


def _reserve_only(decode, request_id: str, prompt: list[int]) -> worker_pb2.ReserveReply:
    reply = decode.reserve(worker_pb2.ReserveRequest(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, prompt_token_ids=prompt,
        sampling=sampling_to_proto(SamplingParams(max_tokens=8)), seed=7))
    assert reply.accepted, reply.reason
    return reply


def _error_of(outputs: queue.Queue, request_id: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for delta in outputs.get(timeout=30).deltas:
            if delta.request_id == request_id and delta.error:
                return delta.error
    raise AssertionError(f"no error delta for {request_id}")


@pytest.mark.parametrize("stale", [False, True], ids=["link-closed", "stale-descriptor"])
def test_an_expected_transfer_whose_channel_goes_fails_and_frees_its_reservation(
        pair, default_loaded, stale):
    # A descriptor that names a replaced generation, or one still expected when its link is
    # replaced (closed): the transfer fails at once, the router hears of it (and moves the
    # request), and the reservation's blocks come back. Both used to wait forever.
    _, decode, outputs = pair
    prompt = default_loaded.tokenizer.encode("A transfer that will never come.")
    reply = _reserve_only(decode, "orphan", prompt)
    link = decode.links["prefill-t"]
    key = "prefill-t->decode-t@g99" if stale else link.key
    desc = new_descriptor(key, link.next_seq + 5, "orphan", len(prompt),
                          reply.num_blocks, (0, default_loaded.config.num_layers), 4)
    decode.expect_transfer("prefill-t", desc)
    if not stale:
        link.close()
    error = _error_of(outputs, "orphan")
    assert error.startswith("KV transfer failed:")
    assert ("no channel" if stale else "closed") in error
    _wait_idle(decode)
