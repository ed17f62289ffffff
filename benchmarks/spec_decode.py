"""Speculative decoding (n-gram or draft-model drafts) against plain decoding, same run.

A repetitive workload (prompts that ask to repeat or continue what they contain: lists, code,
sentences) decoded greedily at batch 1, 8 and 32, with and without `speculative.method=ngram`,
interleaved so load drift on a shared machine favours neither: output tokens per second, the
acceptance rate (kept / drafted) and the mean tokens per verification (1 + kept / drafts).
Outputs are checked identical. Default: the default model on CPU; `--device cuda --model ...`
for a GPU (random-weight shapes draft nothing useful: use a real checkpoint there).
`--method draft_model --draft-model default`: a draft model instead of n-gram.
Run: python benchmarks/spec_decode.py [--batches 1,8,32] -> benchmarks/results/spec_decode_<device>.json

`--draft-costs`: what acceptance does not change, on random weights (benchmarks/spec_costs.py):
plain decode, verification at k = 1..4 and drafting-round milliseconds, and the tokens/s they
project at acceptance rates 0.5 / 0.7 / 0.9 (a projection, not a measured speed-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/: its kernels.py would shadow the `kernels` package

from engine.config import EngineConfig, SpeculativeConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

PROMPTS = [
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Monday, Tuesday,",
    "<tr><td>1</td><td>one</td></tr>\n<tr><td>2</td><td>two</td></tr>\n<tr><td>3</td>",
    "import numpy as np\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as",
]


def run(engine: LLMEngine, prompts: list[str], max_tokens: int) -> tuple[float, list]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / seconds, [o.token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", default="ngram", choices=["ngram", "draft_model"])
    parser.add_argument("--draft-model", default=None, help="with --method draft_model")
    parser.add_argument("--draft-costs", action="store_true",
                        help="costs and projected tokens/s on random weights (spec_costs.py)")
    parser.add_argument("--tiny", action="store_true", help="--draft-costs on tiny shapes")
    args = parser.parse_args()
    if args.draft_costs:
        from benchmarks.spec_costs import main as costs_main

        costs_main(args.device, [int(b) for b in args.batches.split(",")], args.tiny)
        return
    plain = LLMEngine(EngineConfig(model=args.model, device=args.device))
    spec = LLMEngine(EngineConfig(model=args.model, device=args.device,
                                  speculative=SpeculativeConfig(
                                      args.method, args.k, draft_model=args.draft_model)))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(batch)]
        run(plain, prompts[:1], 4), run(spec, prompts[:1], 4)  # warm
        base = spec.spec.stats.as_core_stats()
        plain_tps, spec_tps = [], []
        for _ in range(args.repeats):  # interleaved
            tps, want = run(plain, prompts, args.max_tokens)
            plain_tps.append(tps)
            tps, got = run(spec, prompts, args.max_tokens)
            spec_tps.append(tps)
            if got != want:
                raise AssertionError(f"batch {batch}: speculative outputs differ from plain")
        now = spec.spec.stats.as_core_stats()
        drafts = now["spec_drafts"] - base["spec_drafts"]
        drafted = now["spec_draft_tokens"] - base["spec_draft_tokens"]
        kept = now["spec_accepted_tokens"] - base["spec_accepted_tokens"]
        row = {"batch": batch, "plain_tok_s": max(plain_tps), "spec_tok_s": max(spec_tps),
               "speedup": max(spec_tps) / max(plain_tps),
               "acceptance_rate": kept / drafted if drafted else 0.0,
               "mean_tokens_per_verification": 1 + kept / drafts if drafts else 1.0,
               "drafting": "paused (batch > max_batch_size)" if not drafts else "on"}
        rows.append(row)
        print(row, flush=True)
    suffix = "" if args.method == "ngram" else "_draft_model"
    out = ROOT / "benchmarks" / "results" / f"spec_decode{suffix}_{args.device}.json"
    out.write_text(json.dumps({"model": args.model, "device": args.device,
                               "method": args.method, "draft_model": args.draft_model,
                               "host": platform.processor() or platform.machine(),
                               "k": args.k, "max_tokens": args.max_tokens, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
