"""Tiny random Mixtral, Qwen2-MoE and Qwen3-MoE models (8 experts, top-2, odd expert size),
saved by `save_pretrained` with per-expert tensors (transformers 4 names, its default) and
packed ones (transformers 5's in-memory layout): fp32 greedy tokens identical to HF
transformers, next-token logits within 1e-4 relative, and the same top-k experts as HF's router
at every position."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from engine.builder import build_model
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.layers.moe import FusedMoE
from engine.llm_engine import LLMEngine
from engine.loader.hf import parse_hf_config
from engine.loader.source import open_model
from engine.models.config import MoEConfig
from engine.models.llama import LlamaMLP
from engine.models.registry import model_entry
from engine.models.weights import load_weights
from engine.sampling_params import SamplingParams
from tests.engine.moe_factories import MOE_VARIANTS, save_tiny_moe_model
from tests.helpers import assert_greedy_matches_hf, assert_logits_close_to_hf, assert_no_leaks

PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 137)), list(range(7, 400, 13)), [42] * 16]
LAYOUTS = ("per-expert", "packed")


@pytest.fixture(scope="module", params=[(a, layout) for a in MOE_VARIANTS for layout in LAYOUTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request, tmp_path_factory):
    arch, layout = request.param
    path = save_tiny_moe_model(tmp_path_factory.mktemp(f"{arch}-{layout}"), arch,
                               packed=layout == "packed")
    # "eager": the routed-expert loop HF documents as its reference (its grouped_mm path
    # needs 16-byte strides, which an odd expert size breaks)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              experts_implementation="eager").eval()
    config = EngineConfig(model=str(path), device="cpu", dtype="float32",
                          # every test computes every position (the router test captures them)
                          cache=CacheConfig(block_size=8, num_blocks=128,
                                            enable_prefix_caching=False),
                          scheduler=SchedulerConfig(max_num_batched_tokens=24))
    return path, layout, hf, LLMEngine(config)


def test_checkpoint_holds_the_layout_under_test(tiny):
    path, layout, _, _ = tiny
    with safe_open(path / "model.safetensors", framework="pt") as tensors:
        names = list(tensors.keys())
    packed = [n for n in names if n.endswith("experts.gate_up_proj")]
    per_expert = [n for n in names if ".experts.0." in n]
    assert (bool(packed), bool(per_expert)) == (layout == "packed", layout == "per-expert")


def test_greedy_tokens_match_hf(tiny):
    _, _, hf, engine = tiny
    assert_greedy_matches_hf(engine, hf, PROMPTS, 24)  # concurrent, chunked (budget 24)


def test_next_token_logits_close_to_hf(tiny):
    _, _, hf, engine = tiny
    assert_logits_close_to_hf(engine, hf, PROMPTS)


def _capture(routers, picks: dict[str, list[torch.Tensor]], ids_of):
    handles = []
    for name, router in routers.items():
        hook = (lambda n: lambda mod, args, out: picks[n].append(ids_of(out).clone()))(name)
        handles.append(router.register_forward_hook(hook))
    return handles


@torch.inference_mode()
def test_router_picks_the_experts_hf_picks_at_every_position(tiny):
    _, _, hf, engine = tiny
    prompt, num_new = list(range(100, 137)), 12
    ours_layers = engine.runner.model.layers
    sparse = [i for i, layer in ours_layers.items() if isinstance(layer.mlp, FusedMoE)]
    ours = {i: [] for i in sparse}
    handles = _capture({i: ours_layers[i].mlp.gate for i in sparse}, ours, lambda out: out[1])
    try:
        out = engine.generate([prompt], SamplingParams(max_tokens=num_new, temperature=0.0,
                                                       ignore_eos=True))[0]
    finally:
        for handle in handles:
            handle.remove()
    theirs = {i: [] for i in sparse}
    hf_layers = hf.model.layers
    handles = _capture({i: hf_layers[int(i)].mlp.gate for i in sparse}, theirs,
                       lambda out: out[2])
    try:
        hf(torch.tensor([prompt + out.token_ids[:-1]]))
    finally:
        for handle in handles:
            handle.remove()
    for i in sparse:
        assert torch.equal(torch.cat(ours[i]), theirs[i][0]), f"layer {i}"
        # decode steps route one token to 2 of 8 experts: most experts get none
        assert len(torch.unique(ours[i][-1])) == 2
    assert_no_leaks(engine)


def test_dense_and_sparse_layers_follow_the_config(tiny):
    path, _, hf, engine = tiny
    for i, layer in engine.runner.model.layers.items():
        hf_sparse = hasattr(hf.model.layers[int(i)].mlp, "experts")
        assert isinstance(layer.mlp, FusedMoE if hf_sparse else LlamaMLP), f"layer {i}"
    if path.name.startswith("qwen2_moe"):
        assert isinstance(engine.runner.model.layers["1"].mlp, LlamaMLP)
        assert engine.runner.model.layers["0"].mlp.shared_expert is not None


BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("raw, expected", [
    (dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
     MoEConfig(8, 2, 128, norm_topk_prob=True)),
    (dict(model_type="qwen2_moe", num_experts=60, num_experts_per_tok=4,
          moe_intermediate_size=37, shared_expert_intermediate_size=48, decoder_sparse_step=2,
          mlp_only_layers=[3]),
     MoEConfig(60, 4, 37, norm_topk_prob=False, shared_expert_intermediate_size=48,
               decoder_sparse_step=2, mlp_only_layers=(3,))),
    (dict(model_type="qwen3_moe", num_local_experts=128, num_experts_per_tok=8,
          moe_intermediate_size=768, norm_topk_prob=True),
     MoEConfig(128, 8, 768, norm_topk_prob=True)),
])
def test_registry_reads_each_moe_config(raw, expected):
    cfg = parse_hf_config({**BASE, **raw}, name="m")
    assert cfg.moe == expected and cfg.architecture == raw["model_type"]
    assert model_entry(cfg.architecture).model_class.__name__.lower() == (
        raw["model_type"].replace("_", "") + "forcausallm")


def test_sparse_layers_follow_step_and_mlp_only_layers():
    moe = MoEConfig(8, 2, 16, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [moe.is_sparse(i) for i in range(6)] == [False, True, False, False, False, True]


def test_registry_resolves_by_architectures_and_refuses_unknown_models():
    raw = {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
           "num_experts_per_tok": 2, "moe_intermediate_size": 16}
    assert parse_hf_config(raw, name="m").architecture == "qwen3_moe"
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*qwen3_moe"):
        parse_hf_config({**BASE, "model_type": "gpt2"}, name="m")
    with pytest.raises(ValueError, match="missing required field 'moe_intermediate_size'"):
        parse_hf_config({**BASE, "model_type": "qwen3_moe", "num_experts": 8,
                         "num_experts_per_tok": 2}, name="m")


def test_pipeline_parallel_moe_gives_the_tokens_of_hf(tmp_path):
    """Two pipeline stages (real rank processes, Gloo): Qwen2-MoE's sparse layer 0 and dense
    layer 1 on stage 0, sparse layer 2 on stage 1."""
    path = save_tiny_moe_model(tmp_path / "qwen2_moe", "qwen2_moe")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              experts_implementation="eager").eval()
    config = EngineConfig(model=str(path), device="cpu", dtype="float32",
                          cache=CacheConfig(block_size=8, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=24),
                          parallel=ParallelConfig(1, 2, pipeline_layers=(2, 1)))
    engine = LLMEngine(config)
    try:
        assert_greedy_matches_hf(engine, hf, PROMPTS, 8)
    finally:
        engine.shutdown()


def test_a_missing_expert_tensor_is_named(tmp_path):
    path = save_tiny_moe_model(tmp_path / "mixtral", "mixtral")
    source = open_model(path)
    model = build_model(source.config, torch.float32, "cpu")
    weights = [(n, w) for n, w in source.iter_weights()
               if n != "model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.mlp\.w13:up\.3"):
        load_weights(model, weights)
