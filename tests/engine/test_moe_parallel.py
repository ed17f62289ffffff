"""MoE under tensor parallelism and expert parallelism, on CPU over real Gloo groups in real
rank processes (spawned once for every scenario), against one rank.

Tiny random Mixtral, Qwen2-MoE (gated shared expert, a dense layer) and Qwen3-MoE models, 8
experts, top-2, run EP=2 and EP=4 (odd expert size 37) and TP=2 (MoE under TP: expert size 38,
each expert's intermediate dimension split). Every rank must sample the one-rank ids with the
one-rank logits, count the same expert load (rank 0's counts cover every expert once), equal a
host recount of the router's choices, and hold only its experts. The shared expert alone must
equal one rank's, which fails if it were computed whole on every rank and summed.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from prometheus_client import CollectorRegistry

from cluster.config import PoolConfig
from cluster.config_checks import check_expert_parallel_fits
from engine.builder import build_model
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.layers.moe import FusedMoE, fused_experts_ref, select_experts
from engine.llm_engine import LLMEngine
from engine.metrics import EngineMetrics
from engine.loader.source import open_model
from engine.models.weights import load_weights
from engine.parallel import ParallelContext, check_parallel_sizes
from engine.sampling_params import SamplingParams
from pdserve.metrics import MetricFactory
from router.colocated import ColocatedBackend
from tests.engine.model_parallel_worker import load_stage
from tests.engine.moe_factories import MOE_VARIANTS, save_tiny_moe_model
from tests.engine.test_moe_gguf import write_moe_gguf
from tests.engine.moe_parallel_worker import MoEScenario, probe_model, rank_main
from tests.helpers import assert_no_leaks

NUM_RANKS = 4
SPLITS = {"ep2": (2, 2), "ep4": (4, 4), "tp2": (2, 1)}  # name -> (tp, ep)
SPAWN_DEADLINE_S = 120.0
EVEN_EXPERT_SIZE = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size",
                    "qwen3_moe": "moe_intermediate_size"}


def _model_key(arch: str, split: str) -> str:
    return f"{arch}-even" if split.startswith("tp") else arch


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe-parallel-models")
    paths = {}
    for arch in MOE_VARIANTS:
        paths[arch] = str(save_tiny_moe_model(root / arch, arch))
        paths[f"{arch}-even"] = str(save_tiny_moe_model(
            root / f"{arch}-even", arch, extra_config={EVEN_EXPERT_SIZE[arch]: 38}))
    return paths


@pytest.fixture(scope="module")
def references(model_paths) -> dict[str, dict]:
    """One rank's results for every model: what each split must reproduce."""
    single = ParallelContext.single()
    results = {}
    for key, path in model_paths.items():
        model, kv_cache = load_stage(path, single)
        results[key] = probe_model(model, single, kv_cache)
    return results


@pytest.fixture(scope="module")
def parallel_results(model_paths, tmp_path_factory) -> dict[str, list[dict]]:
    scenarios = [MoEScenario(f"{arch}-{split}", model_paths[_model_key(arch, split)], tp, ep)
                 for arch in MOE_VARIANTS for split, (tp, ep) in SPLITS.items()]
    out_dir = tmp_path_factory.mktemp("moe-parallel-results")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=SPAWN_DEADLINE_S))
    procs = mp.start_processes(rank_main, args=(store.port, scenarios, str(out_dir)),
                               nprocs=NUM_RANKS, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not procs.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"MoE ranks did not finish within {SPAWN_DEADLINE_S}s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return {sc.name: [torch.load(out_dir / f"{sc.name}-rank{r}.pt") for r in range(sc.tp)]
            for sc in scenarios}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("arch", list(MOE_VARIANTS))
def test_split_gives_the_tokens_and_logits_of_one_rank(arch, split, references,
                                                       parallel_results):
    ref = references[_model_key(arch, split)]
    for rank in parallel_results[f"{arch}-{split}"]:
        for got, want in zip(rank["ids"], ref["ids"]):
            assert torch.equal(got, want)
        for got, want in zip(rank["logits"], ref["logits"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("arch", list(MOE_VARIANTS))
def test_expert_counts_cover_every_expert_once(arch, split, references, parallel_results):
    ref = references[_model_key(arch, split)]
    assert torch.equal(ref["expert_counts"], ref["host_recount"])
    for rank in parallel_results[f"{arch}-{split}"]:  # rank 0's are the instance's
        assert torch.equal(rank["expert_counts"], ref["expert_counts"])
        assert torch.equal(rank["host_recount"], ref["host_recount"])


@pytest.mark.parametrize("split", list(SPLITS))
def test_each_rank_holds_its_experts_or_its_slice(split, parallel_results):
    tp, ep = SPLITS[split]
    for r, rank in enumerate(parallel_results[f"mixtral-{split}"]):
        if ep > 1:
            assert rank["local_experts"] == list(range(r * 8 // ep, (r + 1) * 8 // ep))
            assert rank["w13_shape"] == (8 // ep, 2 * 37, 64)
        else:
            assert rank["local_experts"] == list(range(8))
            assert rank["w13_shape"] == (8, 2 * 38 // tp, 64)


@pytest.mark.parametrize("split", list(SPLITS))
def test_shared_expert_is_counted_once_per_token(split, references, parallel_results):
    ref = references[_model_key("qwen2_moe", split)]["probe"]
    assert ref["shared_only"].abs().max() > 1e-3  # the probe can tell once from tp times
    for rank in parallel_results[f"qwen2_moe-{split}"]:
        torch.testing.assert_close(rank["probe"]["shared_only"], ref["shared_only"],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank["probe"]["full"], ref["full"], atol=1e-5, rtol=1e-5)


def test_expert_map_partials_sum_to_the_whole():
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(8, 2 * 5, 16, generator=gen), torch.randn(8, 16, 5, generator=gen)
    x = torch.randn(40, 16, generator=gen)
    weights, ids = select_experts(torch.randn(40, 8, generator=gen), 2, True)
    whole = fused_experts_ref(x, w13, w2, weights, ids)
    parts = []
    for rank in range(4):
        mapping = torch.full((8,), -1, dtype=torch.int32)
        mapping[2 * rank:2 * rank + 2] = torch.arange(2, dtype=torch.int32)
        local = slice(2 * rank, 2 * rank + 2)
        parts.append(fused_experts_ref(x, w13[local], w2[local], weights, ids, mapping))
    torch.testing.assert_close(sum(parts), whole, atol=1e-5, rtol=1e-5)
    assert all(p.abs().max() > 0 for p in parts)


def test_parallel_moe_refusals_name_the_sizes(model_paths):
    mixtral = open_model(model_paths["mixtral"]).config  # expert size 37, 8 experts
    check_parallel_sizes(mixtral, 2, 1, 2)
    with pytest.raises(ValueError, match=r"moe intermediate_size \(37\) is not divisible by "
                                         "tensor parallel size 2.*expert_parallel_size = 2"):
        check_parallel_sizes(mixtral, 2, 1)
    with pytest.raises(ValueError, match=r"expert_parallel_size \(2\) must equal "
                                         r"tensor_parallel_size \(4\)"):
        check_parallel_sizes(mixtral, 4, 1, 2)
    with pytest.raises(ValueError, match=r"num_experts \(8\) is not divisible by "
                                         "expert_parallel_size 3"):
        check_parallel_sizes(replace(mixtral, num_heads=6, num_kv_heads=3), 3, 1, 3)
    dense = replace(mixtral, architecture="llama", moe=None, intermediate_size=128)
    with pytest.raises(ValueError, match="expert_parallel_size 2 needs a mixture-of-experts "
                                         "model; llama is dense"):
        check_parallel_sizes(dense, 2, 1, 2)
    with pytest.raises(ValueError, match="expert_parallel_size must be 1 or "
                                         r"tensor_parallel_size \(2\)"):
        ParallelConfig(tensor_parallel_size=2, expert_parallel_size=4)
    with pytest.raises(ValueError, match="expert parallel size 2 must be 1 or the tensor"):
        ParallelContext(tp_size=1, ep_size=2)
    pool = PoolConfig("decode", tensor_parallel_size=2, expert_parallel_size=2)
    check_expert_parallel_fits(pool, mixtral)  # what a cluster checks before placing instances
    with pytest.raises(ValueError, match="decode.expert_parallel_size / tensor_parallel_size: "
                                         "expert_parallel_size 2 needs a mixture-of-experts"):
        check_expert_parallel_fits(pool, dense)


def test_engine_at_ep2_generates_the_tokens_of_one_rank(model_paths):
    """The whole path from the config: LLMEngine with a second rank process, expert parallel."""
    prompts = [[1, 2, 3, 4, 5], list(range(100, 137)), [42] * 16]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def engine(tp: int, ep: int) -> LLMEngine:
        return LLMEngine(EngineConfig(
            model=model_paths["qwen2_moe"], device="cpu", dtype="float32",
            cache=CacheConfig(block_size=8, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=24),
            parallel=ParallelConfig(tp, 1, expert_parallel_size=ep)))

    one = engine(1, 1)
    want = [out.token_ids for out in one.generate(prompts, params)]
    two = engine(2, 2)
    try:
        assert [out.token_ids for out in two.generate(prompts, params)] == want
        assert_no_leaks(two)
        counts = two.expert_load.totals(max_age_s=0)
    finally:
        two.shutdown()
    # rank 0 counts every expert once: tokens computed x top-2 x 2 MoE layers (layer 1 dense)
    num_tokens = sum(len(p) for p in prompts) + len(prompts) * (params.max_tokens - 1)
    assert sum(counts) == num_tokens * 2 * 2
    assert counts == one.expert_load.totals(max_age_s=0)


def test_expert_load_is_published_and_in_cluster_state(model_paths):
    registry = CollectorRegistry()
    metrics = EngineMetrics(MetricFactory("tiny-moe", registry))
    engine = LLMEngine(EngineConfig(model=model_paths["mixtral"], device="cpu", dtype="float32",
                                    cache=CacheConfig(block_size=8, num_blocks=32)))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.generate([list(range(3, 40))], params)
    metrics.publish(engine)  # the snapshot is at most a second old: read it fresh below
    totals = engine.expert_load.totals(max_age_s=0)
    metrics.publish(engine)
    metrics.publish(engine)  # nothing new: nothing added, the gauge keeps its window
    layers = [m for m in engine.runner.model.modules() if isinstance(m, FusedMoE)]
    assert totals == tuple(sum(layer.expert_counts for layer in layers).tolist())
    assert sum(totals) == (37 + 3) * 2 * len(layers)  # top-2, every Mixtral layer sparse

    def sample(name: str, **labels) -> float:
        return registry.get_sample_value(f"pdserve:{name}", {"model_name": "tiny-moe", **labels})
    assert [sample("moe_expert_tokens_total", expert=str(e)) for e in range(8)] == list(totals)
    assert sample("moe_expert_load_imbalance") == pytest.approx(max(totals) * 8 / sum(totals))
    assert engine.stats().expert_token_counts == totals
    (state,) = asyncio.run(ColocatedBackend(engine).cluster_state())  # GetClusterState's
    assert tuple(state.expert_token_counts) == totals


class _RecordingWeight:
    """A lazy checkpoint weight that records which slices the loader read from disk."""

    def __init__(self, name, lazy, reads):
        self.name, self.lazy, self.reads, self.shape = name, lazy, reads, lazy.shape

    def narrow(self, dim, start, length):
        self.reads.append((self.name, dim, start, length))
        return self.lazy.narrow(dim, start, length)


def _moe_layer(path: str, parallel: ParallelContext) -> tuple[FusedMoE, list[tuple]]:
    source = open_model(path)
    model = build_model(source.config, torch.float32, "cpu", parallel)
    reads: list[tuple] = []
    load_weights(model, ((n, _RecordingWeight(n, w, reads)) for n, w in source.iter_lazy_weights()))
    return next(m for m in model.modules() if isinstance(m, FusedMoE)), reads


@pytest.mark.parametrize("packed", [False, True], ids=["per-expert", "packed"])
def test_expert_parallel_rank_reads_only_its_experts(tmp_path, packed):
    path = str(save_tiny_moe_model(tmp_path / "mixtral", "mixtral", packed=packed))
    whole, _ = _moe_layer(path, ParallelContext.single())
    layer, reads = _moe_layer(path, ParallelContext(tp_rank=1, tp_size=2, ep_size=2))
    assert torch.equal(layer.w13, whole.w13[4:]) and torch.equal(layer.w2, whole.w2[4:])
    expert_reads = [r for r in reads if ".experts." in r[0]]
    if packed:  # each stacked tensor narrowed to experts 4..7 before it is read
        assert expert_reads and all(r[1:] == (0, 4, 4) for r in expert_reads)
    else:  # experts 0..3 never read
        read_experts = {int(re.search(r"\.experts\.(\d+)\.", r[0])[1]) for r in expert_reads}
        assert read_experts == {4, 5, 6, 7}


def test_tensor_parallel_rank_holds_its_intermediate_slice(model_paths):
    whole, _ = _moe_layer(model_paths["mixtral-even"], ParallelContext.single())
    layer, _ = _moe_layer(model_paths["mixtral-even"], ParallelContext(tp_rank=1, tp_size=2))
    gate, up = whole.w13[:, 19:38], whole.w13[:, 38 + 19:]  # expert size 38, rank 1's half
    assert torch.equal(layer.w13, torch.cat([gate, up], dim=1))
    assert torch.equal(layer.w2, whole.w2[:, :, 19:])


def test_expert_parallel_rank_of_a_gguf_file_holds_its_experts(tmp_path):
    folder = save_tiny_moe_model(tmp_path / "qwen2_moe", "qwen2_moe",
                                 extra_config={"mlp_only_layers": []})  # GGUF: all sparse
    path = tmp_path / "qwen2_moe.F32.gguf"
    write_moe_gguf(folder, path, "qwen2_moe")
    whole, _ = _moe_layer(str(folder), ParallelContext.single())
    layer, reads = _moe_layer(str(path), ParallelContext(tp_rank=1, tp_size=2, ep_size=2))
    assert torch.equal(layer.w13, whole.w13[4:]) and torch.equal(layer.w2, whole.w2[4:])
    expert_reads = [r for r in reads if ".experts." in r[0]]  # ffn_{gate,up,down}_exps
    assert len(expert_reads) == 3 * 3 and all(r[1:] == (0, 4, 4) for r in expert_reads)
