"""Speculative decoding's costs that do not depend on acceptance, and the speed they project.

Random weights draft nothing a target accepts, so a measured speed-up on them would only show
the overhead. What is measured here instead, per batch size (every request at `--context`
tokens), through the engine's own pieces (PlanBuilder plans, ModelRunner steps with CUDA graphs
where the engine uses them, the draft-model proposer's `fill`, the n-gram proposer):

- plain decode step ms (k = 0);
- verification step ms at k = 1..4 (k + 1 tokens per request through the prefill attention
  path, rejection sampling);
- drafting-round ms at k = 1..4 for a draft of the 135M default model's shape (SmolLM2:
  30 layers, hidden 576, 9 heads / 3 KV heads) with the target's vocabulary: a 2-token catch-up
  forward, then k - 1 single-token steps, the host plans and the one sync included;
- the n-gram proposer's host ms for the batch.

Projection: with a per-token acceptance probability a, a verification emits
(1 - a^(k+1)) / (1 - a) tokens per request on average; projected tokens/s =
batch * that / (draft ms + verification ms), against batch / plain ms. The engine core's own
per-step host work (read-back, detokenizing, stop checks) is left out of all three alike.
Target: Llama-3-8B shape, bf16, on CUDA; `--tiny` runs tiny shapes on CPU (a dry run).
"""

from __future__ import annotations

import platform
import time

import torch

from engine.builder import build_model, init_random_weights, make_kv_cache
from engine.config import CacheConfig, EngineConfig, SpeculativeConfig
from engine.kv_cache.block_table import KVCacheManager, num_blocks_for
from engine.model_runner import ModelRunner
from engine.attention import get_backend
from engine.models.config import ModelConfig
from engine.plan import PlanBuilder
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.spec.draft_model import DraftModelProposer
from engine.spec.draft_runner import DraftRunner
from engine.spec.ngram import NgramConfig, NgramProposer
from engine.spec.proposer import PENDING

LLAMA3_8B = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        head_dim=128, max_position_embeddings=8192, rope_theta=500000.0)
SMOLLM2_135M = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=576,
                           intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                           head_dim=64, max_position_embeddings=8192, rope_theta=100000.0)
TINY_TARGET = ModelConfig(architecture="llama", vocab_size=1024, hidden_size=64,
                          intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, max_position_embeddings=1024)
TINY_DRAFT = ModelConfig(architecture="llama", vocab_size=1024, hidden_size=32,
                         intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, max_position_embeddings=1024)
KS = (1, 2, 3, 4)
ACCEPTANCE = (0.5, 0.7, 0.9)
BLOCK_SIZE = 16


class Setup:
    """Target and draft runners over one block pool, and a batch of requests at `context`."""

    def __init__(self, device: str, tiny: bool, max_batch: int, context: int) -> None:
        self.target_cfg, draft_cfg = (TINY_TARGET, TINY_DRAFT) if tiny else (LLAMA3_8B,
                                                                             SMOLLM2_135M)
        max_len = context + 2 * max(KS) + 2
        num_blocks = max_batch * num_blocks_for(max_len, BLOCK_SIZE) + 1
        self.config = EngineConfig(
            model="random", device=device, max_model_len=max_len,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
            speculative=SpeculativeConfig("draft_model", max(KS), draft_model="random",
                                          max_batch_size=max_batch, adaptive=False))
        dtype = self.config.torch_dtype
        models = []
        for cfg in (self.target_cfg, draft_cfg):
            model = build_model(cfg, dtype, device)
            init_random_weights(model)
            models.append(model)
        kv = make_kv_cache(self.target_cfg, self.config, num_blocks=num_blocks)
        self.target = ModelRunner(models[0], kv, get_backend("auto", device), BLOCK_SIZE,
                                  self.target_cfg.vocab_size, device, max_model_len=max_len,
                                  max_num_seqs=max_batch)
        if self.target.decode_graphs is not None:
            self.target.decode_graphs.capture_up_to(max_batch)
        self.drafter = DraftRunner(self.config, draft_cfg, models[1], num_blocks, max_len)
        self.kv = KVCacheManager(num_blocks, BLOCK_SIZE)
        self.planner = PlanBuilder(num_blocks_for(max_len, BLOCK_SIZE))
        self.context = context
        self.max_len = max_len

    def requests(self, batch: int) -> list[Request]:
        out = []
        for i in range(batch):
            rid = f"r{i}"
            self.kv.free(rid)
            prompt = torch.randint(0, self.target_cfg.vocab_size, (self.context,)).tolist()
            request = Request(rid, prompt, SamplingParams(max_tokens=4096, temperature=0.0,
                                                          ignore_eos=True), i, self.max_len)
            request.num_computed_tokens = self.context - 1
            self.kv.grow(rid, self.context + max(KS))
            out.append(request)
        return out

    def step_ms(self, requests: list[Request], k: int) -> float:
        """A plain decode step (k = 0) or a verification of k random drafts per request."""
        chunks = [ScheduledChunk(r, self.context - 1, k + 1, self.kv.block_table(r.request_id),
                                 samples=True,
                                 spec_token_ids=tuple(range(7, 7 + k)))
                  for r in requests]
        return _timed(lambda: self.target.execute(self.planner.build(SchedulerOutput(chunks)))
                      .token_ids.tolist())

    def draft_ms(self, requests: list[Request], k: int) -> float:
        """One drafting round: a 2-token catch-up (the last step's bonus token and one kept
        draft), then k - 1 single-token steps."""
        proposer = DraftModelProposer(k, self.drafter.run, self.max_len, self.kv,
                                      num_blocks_for(self.max_len, BLOCK_SIZE),
                                      graph_rows=self.drafter.graph_rows)

        def round_() -> None:
            chunks = []
            for r in requests:
                r.num_draft_computed_tokens = self.context - 2
                chunks.append(ScheduledChunk(r, self.context - 1, k + 1,
                                             self.kv.block_table(r.request_id), samples=True,
                                             spec_token_ids=(PENDING,) * k))
            proposer.fill(chunks)
        return _timed(round_)


def _timed(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median wall ms of `fn` (each ends in a host read of sampled ids: synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def ngram_ms(requests: list[Request], k: int) -> float:
    proposer = NgramProposer(NgramConfig(num_speculative_tokens=k))
    return _timed(lambda: [proposer.propose(r.all_token_ids, k) for r in requests])


def expected_tokens(acceptance: float, k: int) -> float:
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def measure(setup: Setup, batch: int) -> dict:
    requests = setup.requests(batch)
    plain = setup.step_ms(requests, 0)
    row = {"batch": batch, "plain_step_ms": plain, "plain_tok_s": batch / plain * 1e3,
           "verify_step_ms": {}, "draft_round_ms": {}, "ngram_propose_ms": {}}
    for k in KS:
        row["verify_step_ms"][k] = setup.step_ms(requests, k)
        row["draft_round_ms"][k] = setup.draft_ms(requests, k)
        row["ngram_propose_ms"][k] = ngram_ms(requests, k)
    row["projected_tok_s"] = {
        method: {str(a): {k: batch * expected_tokens(a, k) * 1e3
                          / (row[cost][k] + row["verify_step_ms"][k]) for k in KS}
                 for a in ACCEPTANCE}
        for method, cost in (("draft_model", "draft_round_ms"), ("ngram", "ngram_propose_ms"))}
    return row


def main(device: str, batches: list[int], tiny: bool, context: int = 512) -> None:
    from benchmarks.gpu_common import device_info, write_results

    setup = Setup(device, tiny, max(batches), context)
    rows = []
    for batch in batches:
        row = measure(setup, batch)
        rows.append(row)
        best = {m: {a: max(v.values()) for a, v in per.items()}
                for m, per in row["projected_tok_s"].items()}
        print(f"batch {batch}: plain {row['plain_tok_s']:.0f} tok/s "
              f"({row['plain_step_ms']:.2f} ms); verify ms {_fmt(row['verify_step_ms'])}; "
              f"draft ms {_fmt(row['draft_round_ms'])}; best projected {best}", flush=True)
    name = f"spec_costs{'_tiny' if tiny else ''}"  # + _<gpu>, or _cpu
    path = write_results(name, {
        "what": "acceptance-independent costs of speculative decoding and tokens/s PROJECTED "
                "from them at assumed acceptance rates (not a measured speed-up: random "
                "weights accept nothing)",
        "target": "tiny" if tiny else "Llama-3-8B shape", "draft": "tiny" if tiny else
        "SmolLM2-135M shape with the target's vocabulary", "dtype": str(setup.config.torch_dtype),
        "context_tokens": context, "block_size": BLOCK_SIZE,
        "device": device_info() if device == "cuda" else {"gpu": "cpu"},
        "host": platform.processor() or platform.machine(), "rows": rows})
    print(f"wrote {path}")


def _fmt(values: dict) -> str:
    return " ".join(f"k{k}={v:.2f}" for k, v in values.items())
