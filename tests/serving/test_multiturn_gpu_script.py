"""The multi-turn chat replay shared by the CPU cluster run and the GPU run
(benchmarks/multiturn_replay.py), and the GPU run's script (benchmarks/multiturn_gpu.py) as a
CPU dry run on a tiny random Llama: it stays importable, its counts add up, and greedy answers
are identical with prefix caching on and off."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks import multiturn_gpu
from benchmarks.multiturn_replay import replay, shifted
from benchmarks.multiturn_workload import generate

VOCAB = 1000


def test_each_prompt_is_the_history_with_the_answers_the_server_gave():
    workload = generate(2, 3, system_tokens=20, user_tokens=4, output_tokens=3,
                        vocab_size=VOCAB, seed=3)
    prompts: list[list[int]] = []

    async def stream(prompt: list[int], max_tokens: int):
        prompts.append(prompt)
        answer = [(len(prompt) + i) % VOCAB for i in range(max_tokens)]
        yield answer[:1]  # first token alone, then the rest: TTFT is the first event's
        yield answer[1:]

    turns = asyncio.run(replay(stream, workload, run=2))
    assert [(t.conversation, t.turn) for t in turns] == [(c, i) for c in (0, 1) for i in (0, 1, 2)]
    for conv_index, conv in enumerate(workload.conversations):
        expected = shifted(workload.system_token_ids, 2, VOCAB)
        for turn, result in zip(conv.turns, turns[conv_index * 3:conv_index * 3 + 3]):
            expected = expected + shifted(turn.user_token_ids, 2, VOCAB)
            assert expected in prompts and result.prompt_tokens == len(expected)
            assert result.answer_token_ids == tuple((len(expected) + i) % VOCAB
                                                    for i in range(3))
            assert 0 < result.ttft_s <= result.e2e_s and result.tpot_s is not None
            expected = expected + list(result.answer_token_ids)


def test_the_gpu_script_dry_run_on_cpu_counts_hits_only_with_the_cache_on(tmp_path):
    workload_file, result_file = tmp_path / "chat.json", tmp_path / "result.json"
    workload_file.write_text(generate(4, 3, system_tokens=100, user_tokens=16, output_tokens=8,
                                      vocab_size=VOCAB, seed=5).to_json())
    rc = multiturn_gpu.main(["--tiny", "--device", "cpu", "--workload", str(workload_file),
                             "--warmup-conversations", "2", "--result-file", str(result_file)])
    assert rc == 0
    result = json.loads(result_file.read_text())
    first_on, off, on = result["variants"]  # the default order: on, off, on
    assert [r["prefix_caching"] for r in (first_on, off, on)] == [True, False, True]
    assert [r["run"] for r in (first_on, off, on)] == [0, 1, 2]
    # each engine starts cold; how many hits a burst of first turns finds depends on timing
    assert first_on["prefix_hit_tokens"] > 0 and on["prefix_hit_tokens"] > 0
    assert len(on["ttft_p50_ms_by_turn"]) == 3 and min(on["ttft_p50_ms_by_turn"]) > 0
    assert on["requests"] == off["requests"] == 12
    assert on["prompt_tokens"] == off["prompt_tokens"]  # same answers -> same prompts
    assert on["prefix_hit_tokens"] > 0 and off["prefix_hit_tokens"] == 0
    assert on["prefill_tokens_computed"] == on["prompt_tokens"] - on["prefix_hit_tokens"]
    assert off["prefill_tokens_computed"] == off["prompt_tokens"]
    assert on["preemptions"] == off["preemptions"] == 0
    assert on["output_tokens"] == 12 * 8
    assert result["answers_on_vs_off"]["identical"] == 12
    assert 0 < result["on_over_off"]["prefill_tokens_computed"] < 1
    assert "not applicable" in result["routing"]


def test_the_gpu_script_refuses_an_order_without_both_variants(tmp_path):
    with pytest.raises(SystemExit):
        multiturn_gpu.main(["--tiny", "--device", "cpu", "--order", "on,on"])
