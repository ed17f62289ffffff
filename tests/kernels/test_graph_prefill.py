"""Short prompt chunks in the decode CUDA graphs (issue 18's TTFT path; engine/plan.py
`PlanBuilder._bucket`, engine/cuda_graphs.py `_rows`): a step whose prompt chunks end at or
before `graph_prefill_max_context` runs as one graph replay, one decode row per token.

On CUDA, through `LLMEngine`: the tokens of an engine with graph prefill on equal those with it
off and those of the torch reference path (fp32, tiny model) for prompts shorter and longer than
the cap, chunked, joining running decodes, with speculative verification, asynchronous
scheduling on and off; every KV block comes back. A short prompt's first step is one replay.
Through the model runner: a KV-streaming layer listener sees every layer's complete KV when a
replayed step reports it (engine/model_runner.py `_report_layers_done`)."""

from __future__ import annotations

import pytest
import torch

from engine.builder import LoadedModel, build_model, init_random_weights
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.kernels import dispatch
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.gpu_tokenizer import default_tokenizer_or_skip
from tests.kernels.test_async_engine import word_tokenizer
from tests.kernels.test_end_to_end import TINY

pytestmark = pytest.mark.gpu
CAP = 48  # graph_prefill_max_context: prompts of 3..47 tokens fit, 60 and 100 do not
NUM_BLOCKS = 128
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = build_model(TINY, torch.float32, "cuda")
    init_random_weights(model, seed=int(torch.randint(0, 2**31, ()).item()), std=0.1)
    return model


def _engine(model, graph_prefill: bool, async_scheduling: bool = False,
            speculative: SpeculativeConfig | None = None, reference: bool = False) -> LLMEngine:
    """`model`: the module-scoped TINY model, or a saved HF model's directory."""
    saved = isinstance(model, str)
    config = EngineConfig(model=model if saved else "tiny", device="cuda", dtype="float32",
                          attention_backend="torch" if reference else "auto",
                          use_cuda_graphs=not reference, warmup=False if reference else None,
                          graph_prefill_max_context=CAP if graph_prefill else 0,
                          speculative=speculative or SpeculativeConfig(),
                          cache=CacheConfig(block_size=16, num_blocks=NUM_BLOCKS),
                          # 32 tokens a step: a 40-token prompt is chunked, and prompts join
                          # steps of running decodes
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
                          async_scheduling=async_scheduling)
    if saved:
        return LLMEngine(config)
    return LLMEngine(config, LoadedModel(TINY, model, word_tokenizer(TINY.vocab_size)))


def _drive(engine: LLMEngine, prompts, params, late: int = 3) -> dict[str, list[int]]:
    """Add all but `late` requests, step a while, add the rest while those decode, run out;
    then every block is back in the pool."""
    tokens: dict[str, list[int]] = {}
    named = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    for name, p, sp in named[:-late]:
        engine.add_request(p, sp, request_id=name)
    for step in range(1000):
        if step == 6:
            for name, p, sp in named[-late:]:
                engine.add_request(p, sp, request_id=name)
        elif step > 6 and not engine.has_unfinished():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert not engine.has_unfinished() and engine.kv_manager.is_idle()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks == NUM_BLOCKS
    return tokens


def _replays(engine: LLMEngine) -> int:
    return engine.runner.decode_graphs.num_replays


def _workload():
    lengths = [3, 17, 30, 40, 47, 60, 100, 20]  # 60, 100: past the cap (their late chunks)
    prompts = [torch.randint(3, TINY.vocab_size, (n,)).tolist() for n in lengths]
    params = [GREEDY] * len(lengths)
    params[2] = SamplingParams(max_tokens=12, temperature=0.7, seed=3, ignore_eos=True)
    return prompts, params


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_prefill_tokens_equal_eager_prefill(model, async_scheduling):
    prompts, params = _workload()
    off = _engine(model, graph_prefill=False, async_scheduling=async_scheduling)
    want = _drive(off, prompts, params)
    on = _engine(model, graph_prefill=True, async_scheduling=async_scheduling)
    assert on.async_scheduling == async_scheduling
    got = _drive(on, prompts, params)
    assert got == want
    # the same steps, but the prompt steps within the cap replayed graphs
    assert _replays(on) > _replays(off)


def test_graph_prefill_greedy_equals_the_torch_reference_path(model):
    prompts, _ = _workload()
    params = [GREEDY] * len(prompts)
    got = _drive(_engine(model, graph_prefill=True), prompts, params)
    dispatch.use_triton(False)
    try:
        ref = _engine(model, graph_prefill=False, reference=True)
        assert ref.runner.decode_graphs is None
        want = _drive(ref, prompts, params)
    finally:
        dispatch.use_triton(True)
    assert got == want


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_prefill_with_speculative_verification(cuda, tmp_path, monkeypatch,
                                                     async_scheduling):
    # the target drafts for itself (draft_model): greedy keeps every draft, so verification
    # steps of k + 1 rows run, and share steps with the late requests' prompt rows
    default_tokenizer_or_skip(monkeypatch)
    from tests.engine.factories import save_tiny_hf_model

    path = str(save_tiny_hf_model(tmp_path / "llama", "llama", seed=5))
    prompts = [[7 + (i % period) for i in range(n)] for period, n in
               ((3, 40), (5, 30), (7, 12), (4, 44), (6, 70))]
    params = [GREEDY] * len(prompts)
    spec = SpeculativeConfig("draft_model", 3, adaptive=False, draft_model=path)
    want = _drive(_engine(path, graph_prefill=False, async_scheduling=async_scheduling,
                          speculative=spec), prompts, params, late=2)
    on = _engine(path, graph_prefill=True, async_scheduling=async_scheduling, speculative=spec)
    assert _drive(on, prompts, params, late=2) == want
    plain = _drive(_engine(path, graph_prefill=True), prompts, params, late=2)
    assert plain == want  # speculative greedy is plain greedy
    stats = on.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0, stats


def test_a_short_prompts_first_step_is_one_graph_replay(model):
    prompt = torch.randint(3, TINY.vocab_size, (20,)).tolist()
    first = {}
    for graph_prefill in (True, False):
        engine = _engine(model, graph_prefill=graph_prefill)
        before = _replays(engine)
        rid = engine.add_request(prompt, GREEDY)
        outs = engine.step()
        assert [o.request_id for o in outs if o.new_token_ids] == [rid]
        first[graph_prefill] = outs[0].new_token_ids
        assert _replays(engine) == before + graph_prefill  # on: the prefill; off: eager
        while engine.has_unfinished():
            engine.step()
        assert engine.kv_manager.is_idle()
    assert first[True] == first[False]


@torch.inference_mode()
def test_a_replayed_prefill_reports_every_layer_with_its_kv_written(model):
    """A prefill instance streams KV layer by layer through `on_layer_done`; a graph step
    reports the layers after its replay. The listener here snapshots layer i's cache on the
    current stream when told, as the KV sender orders its reads (kv_transfer/streams.py):
    every snapshot must hold the step's KV, equal to an eager prefill's."""
    from engine.kernels.attention_backend import TritonAttentionBackend
    from engine.model_runner import ModelRunner
    from engine.plan import PlanBuilder
    from engine.request import Request
    from engine.scheduler import ScheduledChunk, SchedulerOutput

    prompt = torch.randint(3, TINY.vocab_size, (37,)).tolist()
    request = Request("p", prompt, GREEDY, 0, TINY.max_position_embeddings)
    table = [5, 9, 2]
    plan = PlanBuilder(graph_prefill_max_context=CAP).build(
        SchedulerOutput([ScheduledChunk(request, 0, len(prompt), table, True)]))
    assert plan.graph_bucket == 64
    snapshots = {}
    for graphs in (True, False):
        kv = torch.zeros(TINY.num_layers, 16, 2, 16, TINY.num_kv_heads, TINY.head_dim,
                         device="cuda")
        runner = ModelRunner(model, kv, TritonAttentionBackend(), 16, TINY.vocab_size, "cuda",
                             use_cuda_graphs=graphs, max_model_len=256, max_num_seqs=4)
        if graphs:
            runner.decode_graphs.capture([64])
        reported: list[int] = []
        seen: list[torch.Tensor] = []

        def on_layer_done(layer: int) -> None:
            reported.append(layer)
            seen.append(kv[layer, table].clone())  # queued on the current stream, now

        out = runner.execute(plan, on_layer_done)
        torch.cuda.synchronize()
        assert reported == list(range(TINY.num_layers))
        assert (runner.decode_graphs.num_replays == 1) if graphs else runner.decode_graphs is None
        for layer, snap in enumerate(seen):
            assert torch.equal(snap, kv[layer, table])  # nothing wrote this layer later
        snapshots[graphs] = (torch.stack(seen), out.token_ids.tolist())
    (rows_kv, rows_token), (eager_kv, eager_token) = snapshots[True], snapshots[False]
    assert rows_kv.abs().sum() > 0
    torch.testing.assert_close(rows_kv, eager_kv, rtol=1e-3, atol=1e-3)  # K, V ~ 1
    assert rows_token == eager_token
