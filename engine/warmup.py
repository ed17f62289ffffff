"""Start-up warm-up: run every kernel variant the engine will use before it serves anything.

Triton compiles a kernel the first time it sees a new specialization (an integer argument that
is 1, a multiple of 16, or neither; a new constexpr), so without this the first request of each
shape pays the compile — 0.8 s for the first 1,024-token prompt on a fresh H200. `warm_up`
drives the engine's own step path (nothing special-cased) through:

- one wave of prompts of lengths 1, 16, 17, 100, 128 and 1,000 (capped by the context), each
  with a different sampling path: greedy, temperature, temperature + top-p, top-k, min-p, and
  logprobs with a repetition penalty; decode steps of every batch size up to the wave's;
- a prompt longer than the step's token budget, so chunked prefill (a chunk attending to
  earlier blocks: the kernel variant a prefix-cache hit also uses) compiles;
- for each decode batch size of `_mixed_decode_batches`, a prompt joining that many decoding
  ones (eager decode attention at every split count it can choose);
- a prompt admitted while another decodes (a mixed prefill + decode step); that other one
  samples with top-p alone, the sort-free top-p kernel's path (in the wave, top-k in the same
  batch sends every row through the sort);
- on a MoE model, one prompt alone per tile configuration of the fused MoE kernels that a step
  can select (`fused_moe.variant_token_counts`: the GEMV path's token buckets, the grouped
  GEMMs' tile buckets), as the wave's steps reach only a few of them.

An eager step's block tables are as wide as its longest sequence, so their row stride changes
from step to step; the attention kernels do not specialize on it (`do_not_specialize`), so the
variants compiled here and by the decode graphs' captures serve every width.

Decode CUDA graphs are captured separately (engine/cuda_graphs.py). The warm-up runs with the
prefix cache detached, so it leaves no cached blocks, hashes or counters behind; afterwards
every block is free and no request is left. On by default on CUDA, off on CPU (no JIT there).
"""

from __future__ import annotations

import logging
import time

from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_LENGTHS = (1, 16, 17, 100, 128, 1000)
_PATHS = (
    SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=0.8, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=0.8, top_k=40, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=0.8, min_p=0.1, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, repetition_penalty=1.1,
                   ignore_eos=True),
)
_DECODING = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)  # still decoding
# while a prompt joins, over its chunks
_DEADLINE_S = 600.0


def _prompt(length: int, vocab_size: int, salt: int) -> list[int]:
    return [(7919 * i + 104729 * salt + 1) % vocab_size for i in range(length)]


def warm_up(core) -> float:
    """Run the warm-up workload through `core` (an idle EngineCore); returns seconds taken."""
    if core.has_unfinished():
        raise RuntimeError("warm-up needs an idle engine")
    started = time.monotonic()
    kv = core.kv_manager
    cache, kv.prefix_cache = kv.prefix_cache, None  # leave no cached blocks or hashes behind
    try:
        _run(core)
    finally:
        kv.prefix_cache = cache
    if kv.num_free_blocks != kv.num_blocks:
        raise RuntimeError(f"warm-up left {kv.num_blocks - kv.num_free_blocks} blocks held")
    elapsed = time.monotonic() - started
    log.info("engine warm-up took %.2f s", elapsed)
    return elapsed


def _run(core) -> None:
    vocab, limit = core.model_config.vocab_size, _max_prompt(core)
    budget = core.config.scheduler.max_num_batched_tokens
    lengths = [min(n, limit) for n in _LENGTHS]
    for i, length in enumerate(lengths):
        core.add_request(_prompt(length, vocab, i), _PATHS[i % len(_PATHS)])
    _drain(core)
    if limit > budget:  # one prompt in chunks
        core.add_request(_prompt(min(budget + 17, limit), vocab, 99), _PATHS[0])
        _drain(core)
    # top-p alone: in the wave it shares a batch with top-k, which takes the sorting path
    core.add_request(_prompt(min(40, limit), vocab, 7), _PATHS[2])
    core.step()  # its prefill (the sort-free top-p); the next prompt joins while it decodes
    core.add_request(_prompt(min(33, limit), vocab, 8), _PATHS[0])
    _drain(core)
    for batch in _mixed_decode_batches(core):
        _mixed_step(core, batch, vocab)
    for length in moe_prompt_lengths(core):
        core.add_request(_prompt(length, vocab, 200 + length), _PATHS[0])
        _drain(core)


def moe_prompt_lengths(core) -> list[int]:
    """Prompt lengths whose prefill steps (alone) select every fused MoE tile configuration
    of this rank's experts, up to the step's token budget and the context; [] for dense
    models."""
    moe = core.model_config.moe
    if moe is None:
        return []
    from engine.kernels.fused_moe import variant_token_counts
    from engine.layers.moe_shards import local_expert_shape

    parallel = core.config.parallel
    experts, inter = local_expert_shape(moe.num_experts, moe.intermediate_size,
                                        parallel.tensor_parallel_size,
                                        parallel.expert_parallel_size)
    cap = min(core.config.scheduler.max_num_batched_tokens, _max_prompt(core))
    return variant_token_counts(experts, core.model_config.hidden_size, inter, moe.top_k,
                                core.config.torch_dtype, cap)


def _mixed_decode_batches(core) -> list[int]:
    """Decode batch sizes for eager mixed steps: the powers of two below the largest batch,
    and the largest (one less than max_num_seqs: the joining prompt needs a slot). Eager
    decode attention picks its split count from the batch (about 4 programs per SM, rounded
    down to a power of two), so these reach every split count a batch up to the largest can
    get; the decode graphs' captures cover decode-only steps, not the eager ones."""
    kv = core.kv_manager
    per_request = -(-(2 + _DECODING.max_tokens) // kv.block_size)  # blocks, prompt + output
    joining = -(-(_joining_length(core) + 1) // kv.block_size)
    top = min(core.config.scheduler.max_num_seqs - 1,
              (kv.num_blocks - joining) // per_request,  # all of it fits: no preemption
              core.config.scheduler.max_num_batched_tokens // 2)
    if top < 1:
        return []
    return sorted({1 << i for i in range(top.bit_length()) if 1 << i < top} | {top})


def _joining_length(core) -> int:
    """Longer than graph prefill takes (a short chunk would join the decodes in a graph)."""
    return min(core.config.graph_prefill_max_context + 17, _max_prompt(core))


def _max_prompt(core) -> int:
    """The longest warm-up prompt: within the context and within what the whole KV cache
    holds (a longer one would be refused), with room for its few output tokens."""
    kv = core.kv_manager
    return min(core.max_model_len, kv.num_blocks * kv.block_size) - 4


def _mixed_step(core, batch: int, vocab: int) -> None:
    """`batch` two-token prompts decoding when a prompt past graph prefill's context limit
    joins: mixed steps run eagerly, their decode rows through the eager decode attention at
    that batch size."""
    for i in range(batch):
        core.add_request(_prompt(2, vocab, 1000 + i), _DECODING)
    _drain(core, until=lambda: all(r.num_computed_tokens >= r.num_prompt_tokens
                                   for r in core.requests.values()))  # all decoding now
    core.add_request(_prompt(_joining_length(core), vocab, 98), _PATHS[0])
    _drain(core)


def _drain(core, until=None) -> None:
    """Step until `until()` holds (default: no request left), within the deadline."""
    done = until or (lambda: not core.has_unfinished())
    deadline = time.monotonic() + _DEADLINE_S
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up did not finish within {_DEADLINE_S:.0f} s")
        core.step()
