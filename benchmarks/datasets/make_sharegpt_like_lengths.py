"""Generates `sharegpt_like_lengths.json`: (input, output) token-length pairs for the serving
benchmark's `--dataset sharegpt-like`.

Synthetic, not derived from ShareGPT: both lengths are log-normal with heavy right tails and
means of a couple of hundred tokens (about 170 in, 225 out), the shape serving papers report for
chat traffic, filtered like `vllm bench serve` filters ShareGPT (each side >= 4 tokens, input
<= 1024, input + output <= 2048). Only lengths ship; the benchmark synthesizes prompts from
token ids. Deterministic for a given seed:

    .venv/bin/python benchmarks/datasets/make_sharegpt_like_lengths.py [--num-pairs 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

OUTPUT_PATH = Path(__file__).with_name("sharegpt_like_lengths.json")
INPUT_MEDIAN, INPUT_SIGMA = 110, 1.1  # log-normal: median tokens, sigma of the log
OUTPUT_MEDIAN, OUTPUT_SIGMA = 150, 0.9
MIN_LEN, MAX_INPUT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048


def sample_pairs(num_pairs: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    pairs: list[list[int]] = []
    while len(pairs) < num_pairs:
        num_in = round(rng.lognormvariate(math.log(INPUT_MEDIAN), INPUT_SIGMA))
        num_out = round(rng.lognormvariate(math.log(OUTPUT_MEDIAN), OUTPUT_SIGMA))
        fits = num_in <= MAX_INPUT_LEN and num_in + num_out <= MAX_TOTAL_LEN
        if fits and min(num_in, num_out) >= MIN_LEN:
            pairs.append([num_in, num_out])
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT_PATH)
    args = parser.parse_args(argv)
    pairs = sample_pairs(args.num_pairs, args.seed)
    header = {"description": "synthetic ShareGPT-like [input_tokens, output_tokens] pairs",
              "generator": "benchmarks/datasets/make_sharegpt_like_lengths.py",
              "seed": args.seed, "num_pairs": len(pairs)}
    body = ",\n".join(json.dumps(pair) for pair in pairs)  # one pair per line: diffable
    args.output.write_text(json.dumps(header)[:-1] + ', "pairs": [\n' + body + "\n]}\n")
    mean_in = sum(p[0] for p in pairs) / len(pairs)
    mean_out = sum(p[1] for p in pairs) / len(pairs)
    print(f"wrote {len(pairs)} pairs to {args.output}: "
          f"mean input {mean_in:.0f}, mean output {mean_out:.0f} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
