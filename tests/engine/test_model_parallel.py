"""Tensor and pipeline parallelism of the model, on CPU over real Gloo groups in real processes.

Tiny random Llama (tied embeddings), Qwen2 (attention bias) and Qwen3 (q/k norm) models of 6
layers run a prefill and a mixed decode+prefill step split TP=2, TP=4 (KV heads replicated:
the models have 2), PP=2, PP=4 (6 layers: 2+2+1+1) and TP=2 x PP=2; the last stage's logits
must equal the single-rank ones. Four processes are spawned once for every split.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from engine.builder import build_model, make_kv_cache, num_kv_blocks_that_fit
from engine.config import CacheConfig, EngineConfig
from engine.loader.source import open_model
from engine.models.weights import load_weights
from engine.parallel import (ParallelContext, check_parallel_sizes, init_parallel_context,
                             kv_heads_of_rank, split_layers)
from tests.engine.factories import save_tiny_hf_model
from tests.engine.model_parallel_worker import Scenario, load_stage, rank_main, run_steps

NUM_RANKS = 4
MODELS = {
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
}
SPLITS = {"tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2), "pp4": (1, 4), "tp2pp2": (2, 2)}
SPAWN_DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parallel-models")
    return {name: str(save_tiny_hf_model(root / name, **options,
                                         extra_config={"num_hidden_layers": 6}))
            for name, options in MODELS.items()}


@pytest.fixture(scope="module")
def references(model_paths) -> dict[str, dict]:
    """Single-rank results of every model: what each split must reproduce."""
    single = ParallelContext.single()
    results = {}
    for name, path in model_paths.items():
        model, kv_cache = load_stage(path, single)
        results[name] = run_steps(model, single, kv_cache)
    return results


@pytest.fixture(scope="module")
def parallel_results(model_paths, tmp_path_factory) -> dict[str, list[dict]]:
    """Spawn the ranks once, run every (model, split) scenario, load what each rank saved."""
    scenarios = [Scenario(f"{model}-{split}", path, tp, pp)
                 for model, path in model_paths.items() for split, (tp, pp) in SPLITS.items()]
    out_dir = tmp_path_factory.mktemp("parallel-results")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=SPAWN_DEADLINE_S))
    _spawn_and_wait(store.port, scenarios, str(out_dir))
    return {sc.name: [torch.load(out_dir / f"{sc.name}-rank{r}.pt")
                      for r in range(sc.tp * sc.pp)] for sc in scenarios}


def _spawn_and_wait(port: int, scenarios: list[Scenario], out_dir: str) -> None:
    procs = mp.start_processes(rank_main, args=(port, scenarios, out_dir), nprocs=NUM_RANKS,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not procs.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"parallel ranks did not finish within {SPAWN_DEADLINE_S}s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("model", list(MODELS))
def test_split_logits_equal_single_rank(model, split, references, parallel_results):
    ref = references[model]
    ranks = parallel_results[f"{model}-{split}"]
    for rank in ranks:  # every rank got the last stage's sampled ids
        for got, want in zip(rank["ids"], ref["ids"]):
            assert torch.equal(got, want)
    last = [rank for rank in ranks if rank["is_last_stage"]]
    assert len(last) == SPLITS[split][0]
    for rank in last:  # each tensor rank of the last stage has the full-vocabulary logits
        for got, want in zip(rank["logits"], ref["logits"]):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", list(SPLITS))
def test_stages_hold_their_layers_and_kv_heads(split, parallel_results):
    tp, pp = SPLITS[split]
    ranks = parallel_results[f"qwen3-{split}"]
    stages = split_layers(6, pp)
    for rank, result in enumerate(ranks):
        start, end = stages[rank // tp]
        assert tuple(result["layer_range"]) == (start, end)
        assert result["kv_shape"][0] == end - start
        assert result["kv_shape"][4] == max(1, 2 // tp)  # 2 KV heads, replicated at tp 4
        assert result["layers_done"] == list(range(end - start)) * 2  # stage-local, two steps


def test_split_layers_even_and_explicit():
    assert split_layers(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert split_layers(7, 2) == [(0, 4), (4, 7)]
    assert split_layers(6, 1) == [(0, 6)]
    assert split_layers(6, 3, (1, 2, 3)) == [(0, 1), (1, 3), (3, 6)]
    with pytest.raises(ValueError, match=r"sum to the model's 6 layers \(they sum to 5\)"):
        split_layers(6, 2, (2, 3))
    with pytest.raises(ValueError, match="between 1 and the model's 2 layers"):
        split_layers(2, 3)


def test_check_parallel_sizes_names_what_does_not_divide(model_paths):
    cfg = open_model(model_paths["qwen3"]).config  # 4 heads, 2 KV heads, 128 MLP, 6 layers
    check_parallel_sizes(cfg, 4, 6)
    with pytest.raises(ValueError, match=r"num_heads \(4\) is not divisible by tensor "
                                         "parallel size 3"):
        check_parallel_sizes(cfg, 3, 1)
    with pytest.raises(ValueError, match=r"intermediate_size \(90\) is not divisible by tensor "
                                         "parallel size 4"):
        check_parallel_sizes(replace(cfg, intermediate_size=90), 4, 1)
    with pytest.raises(ValueError, match=r"num_kv_heads \(6\) and tensor parallel size 4"):
        check_parallel_sizes(replace(cfg, num_heads=24, num_kv_heads=6), 4, 1)
    with pytest.raises(ValueError, match="pipeline parallel size 7 exceeds the model's 6 layers"):
        check_parallel_sizes(cfg, 1, 7)


def test_gqa_kv_head_of_each_rank_serves_its_query_heads():
    num_heads, num_kv_heads = 8, 2
    group = num_heads // num_kv_heads
    for tp in (1, 2, 4, 8):
        for r in range(tp):
            first, count = kv_heads_of_rank(num_kv_heads, ParallelContext(tp_rank=r, tp_size=tp))
            q_heads = range(r * num_heads // tp, (r + 1) * num_heads // tp)
            assert {h // group for h in q_heads} == set(range(first, first + count))


class _RecordingWeight:
    """A lazy checkpoint weight that records which slices the loader asked for."""

    def __init__(self, name, lazy, reads):
        self.name, self.lazy, self.reads, self.shape = name, lazy, reads, lazy.shape

    def narrow(self, dim, start, length):
        self.reads.append((self.name, dim, start, length))
        return self.lazy.narrow(dim, start, length)


def _load_recorded(path: str, parallel: ParallelContext):
    source = open_model(path)
    model = build_model(source.config, torch.float32, "cpu", parallel)
    reads: list[tuple] = []
    load_weights(model, ((n, _RecordingWeight(n, w, reads)) for n, w in source.iter_lazy_weights()))
    return model, reads


def test_rank_loads_only_its_slices(model_paths):
    full = dict(open_model(model_paths["qwen2"]).iter_weights())
    parallel = ParallelContext(tp_rank=3, tp_size=4, pp_rank=1, pp_size=2, layer_start=3,
                               layer_end=6)
    model, reads = _load_recorded(model_paths["qwen2"], parallel)
    attn = model.layers["4"].self_attn
    q_rows = slice(3 * 16, 4 * 16)  # head_dim 16, one query head per rank
    kv_rows = slice(16, 32)  # KV head 1 = 3 // (4 // 2)
    qkv = torch.cat([full["model.layers.4.self_attn.q_proj.weight"][q_rows],
                     full["model.layers.4.self_attn.k_proj.weight"][kv_rows],
                     full["model.layers.4.self_attn.v_proj.weight"][kv_rows]])
    assert torch.equal(attn.qkv_proj.weight, qkv)
    q_bias = full["model.layers.4.self_attn.q_proj.bias"][q_rows]
    assert torch.equal(attn.qkv_proj.bias[:16], q_bias)
    assert torch.equal(attn.o_proj.weight,
                       full["model.layers.4.self_attn.o_proj.weight"][:, 3 * 16:4 * 16])
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"][3 * 12288:])
    assert model.embed_tokens is None and set(model.layers) == {"3", "4", "5"}
    assert not [r for r in reads if r[0].startswith(("model.layers.0.", "model.embed_tokens"))]
    q_reads = [r for r in reads if r[0] == "model.layers.4.self_attn.q_proj.weight"]
    assert q_reads == [("model.layers.4.self_attn.q_proj.weight", 0, 48, 16)]


def test_tied_embedding_feeds_a_last_stage_lm_head(model_paths):
    full = dict(open_model(model_paths["llama-tied"]).iter_weights())
    last = ParallelContext(pp_rank=1, pp_size=2, layer_start=3, layer_end=6)
    model, _ = _load_recorded(model_paths["llama-tied"], last)
    assert torch.equal(model.lm_head.weight, full["model.embed_tokens.weight"])
    first = ParallelContext(pp_rank=0, pp_size=2, layer_start=0, layer_end=3)
    model, _ = _load_recorded(model_paths["llama-tied"], first)
    assert model.lm_head is None and model.norm is None
    with pytest.raises(ValueError, match="has no LM head"):
        model.compute_logits(torch.zeros(1, 64))


def test_kv_cache_per_rank(model_paths):
    cfg = open_model(model_paths["qwen3"]).config
    config = EngineConfig(model=model_paths["qwen3"], device="cpu", dtype="float32",
                          cache=CacheConfig(block_size=4, cpu_kv_cache_bytes=1 << 20))
    stage = ParallelContext(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, layer_start=4,
                            layer_end=6)
    whole = num_kv_blocks_that_fit(cfg, config)
    assert whole == (1 << 20) // (6 * 2 * 4 * 2 * 16 * 4)  # layers, K+V, block, heads, dim, fp32
    assert num_kv_blocks_that_fit(cfg, config, stage) == (1 << 20) // (2 * 2 * 4 * 1 * 16 * 4)
    assert make_kv_cache(cfg, config, stage, num_blocks=5).shape == (2, 5, 2, 4, 1, 16)
    assert make_kv_cache(cfg, config).shape == (6, whole, 2, 4, 2, 16)


def test_a_collective_without_its_peer_times_out():
    """Two ranks in two threads: rank 1 never joins the all-reduce, rank 0 fails at its bound."""
    master = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=10))

    def join(rank: int) -> ParallelContext:  # one store client per rank, as in real processes
        store = torch.distributed.TCPStore("127.0.0.1", master.port, is_master=False,
                                           timeout=timedelta(seconds=10))
        return init_parallel_context(store, rank, 2, 1, 2, "cpu", timeout_s=2.0)

    with ThreadPoolExecutor(2) as pool:
        contexts = list(pool.map(join, range(2)))
    assert [c.rank for c in contexts] == [0, 1] and contexts[1].layer_range == (0, 2)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="tensor-parallel all-reduce failed or exceeded 2.0s"):
        contexts[0].all_reduce(torch.ones(4))
    assert time.monotonic() - started < 10


def test_context_numbers_ranks_stage_by_stage():
    ctx = ParallelContext(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, layer_start=3, layer_end=6)
    assert (ctx.rank, ctx.world_size, ctx.layer_range) == (3, 4, (3, 6))
    assert ctx.is_last_stage and not ctx.is_first_stage
    single = ParallelContext.single()
    assert (single.rank, single.world_size, single.stage_layers(6)) == (0, 1, (0, 6))
    x = torch.ones(3)
    assert single.all_reduce(x) is x and single.broadcast_from_last_stage(x) is x
    with pytest.raises(ValueError, match="has no pipeline group"):
        ctx.recv_prev([(1, 4)], torch.float32, "cpu")
