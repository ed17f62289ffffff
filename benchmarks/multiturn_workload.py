"""A multi-turn chat workload, written as a small JSON file: conversations that share one system
prompt, each turn resending the whole history (system + every earlier user turn and answer +
the new user turn), as chat clients do. The answers are whatever the server generates, so a
replay (benchmarks/serving_multiturn.py) builds each prompt from the previous answers.

    .venv/bin/python benchmarks/multiturn_workload.py                    # issue 17's shape:
        # 64 conversations x 6 turns, 1,000-token system prompt -> benchmarks/datasets/
    .venv/bin/python benchmarks/multiturn_workload.py --conversations 8 --turns 4 \\
        --system-tokens 256 --out benchmarks/datasets/multiturn_chat_cpu.json   # CPU scale

Token ids are random in [100, vocab): the prefix cache and the router see exactly the sharing a
chat has, without a tokenizer or a text corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "datasets" / "multiturn_chat.json"
FIRST_TOKEN_ID = 100  # low ids are special tokens in most vocabularies


@dataclass(slots=True)
class Turn:
    user_token_ids: list[int]
    max_tokens: int  # the answer's length (replayed with ignore_eos)


@dataclass(slots=True)
class Conversation:
    turns: list[Turn] = field(default_factory=list)


@dataclass(slots=True)
class Workload:
    system_token_ids: list[int]
    conversations: list[Conversation]
    vocab_size: int
    seed: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, path: Path) -> Workload:
        data = json.loads(Path(path).read_text())
        conversations = [Conversation([Turn(**t) for t in c["turns"]])
                         for c in data["conversations"]]
        return cls(data["system_token_ids"], conversations, data["vocab_size"], data["seed"])

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def generate(num_conversations: int, num_turns: int, system_tokens: int, user_tokens: int,
             output_tokens: int, vocab_size: int, seed: int = 0) -> Workload:
    """User turns' lengths vary +-50% around `user_tokens`; answers are `output_tokens` long."""
    for name, value in (("conversations", num_conversations), ("turns", num_turns),
                        ("system_tokens", system_tokens), ("user_tokens", user_tokens),
                        ("output_tokens", output_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {FIRST_TOKEN_ID}, got {vocab_size}")
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(n)]

    system = ids(system_tokens)
    conversations = [Conversation([Turn(ids(rng.randint(max(1, user_tokens // 2),
                                                        user_tokens * 3 // 2)), output_tokens)
                                   for _ in range(num_turns)])
                     for _ in range(num_conversations)]
    return Workload(system, conversations, vocab_size, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--user-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=49152, help="the default model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    workload = generate(args.conversations, args.turns, args.system_tokens, args.user_tokens,
                        args.output_tokens, args.vocab_size, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(workload.to_json() + "\n")
    print(f"wrote {args.out}: {len(workload.conversations)} conversations, "
          f"{workload.num_requests} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
