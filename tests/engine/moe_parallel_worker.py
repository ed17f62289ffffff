"""Runs a tiny MoE model on one rank of a tensor- or expert-parallel instance (test helper).

`probe_model` drives the two-step scenario of model_parallel_worker (`run_steps`: a prefill of
three sequences, then their decodes beside a new prefill) and records what the MoE test checks:
the logits and sampled ids, the on-device expert counts summed over layers, a host recount of the
router's top-k ids, and the first MoE layer's output for a fixed input with and without its
routed experts (the shared expert alone). `rank_main` is the spawned process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from engine.layers.moe import FusedMoE
from engine.loader.source import open_model
from engine.parallel import ParallelContext, init_parallel_context
from tests.engine.model_parallel_worker import load_stage, run_steps

TIMEOUT_S = 30.0
PROBE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class MoEScenario:
    """One model split one way over `tp` ranks; `ep` is 1 (MoE under TP) or tp."""

    name: str
    model_path: str
    tp: int
    ep: int


def moe_layers(model: torch.nn.Module) -> list[FusedMoE]:
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


@torch.inference_mode()
def probe_model(model, parallel: ParallelContext, kv_cache: torch.Tensor) -> dict:
    layers = moe_layers(model)
    routed: list[torch.Tensor] = []
    hooks = [layer.gate.register_forward_hook(lambda _m, _i, out: routed.append(out[1]))
             for layer in layers]
    result = run_steps(model, parallel, kv_cache)
    for hook in hooks:
        hook.remove()
    num_experts = layers[0].num_experts
    result["expert_counts"] = sum(layer.expert_counts for layer in layers).clone()
    result["host_recount"] = torch.bincount(torch.cat([ids.flatten() for ids in routed]),
                                            minlength=num_experts)
    result["probe"] = _probe_layer(layers[0])
    return result


def _probe_layer(layer: FusedMoE) -> dict:
    """The layer's output on a fixed input; then with the routed experts silenced (w2 = 0),
    which leaves the (gated) shared expert alone."""
    x = torch.randn(PROBE_TOKENS, layer.w13.shape[-1], generator=torch.Generator().manual_seed(3))
    full = layer(x)
    w2 = layer.w2.data.clone()
    layer.w2.data.zero_()
    shared_only = layer(x)
    layer.w2.data.copy_(w2)
    return dict(full=full, shared_only=shared_only)


def rank_main(rank: int, port: int, scenarios: list[MoEScenario], out_dir: str) -> None:
    """Spawned rank: run every scenario this rank takes part in, save its results."""
    torch.set_num_threads(1)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                       timeout=timedelta(seconds=TIMEOUT_S))
    for i, sc in enumerate(scenarios):
        if rank >= sc.tp:
            continue
        prefixed = torch.distributed.PrefixStore(f"moe-scenario{i}", store)
        cfg = open_model(sc.model_path).config
        parallel = init_parallel_context(prefixed, rank, sc.tp, 1, cfg.num_layers, "cpu",
                                         TIMEOUT_S, ep_size=sc.ep)
        model, kv_cache = load_stage(sc.model_path, parallel)
        result = probe_model(model, parallel, kv_cache)
        layer = moe_layers(model)[0]
        result.update(w13_shape=tuple(layer.w13.shape), local_experts=list(layer.local_experts))
        torch.save(result, Path(out_dir) / f"{sc.name}-rank{rank}.pt")
