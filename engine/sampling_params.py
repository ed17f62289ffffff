"""Per-request sampling options, validated once when the request enters the system."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SEED = 2**63  # seeds must fit a non-negative int64 so they travel as one tensor element
GREEDY_TEMPERATURE = 1e-5  # below this, logits / temperature may overflow: sample greedily
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")  # each must be finite


@dataclass(slots=True)
class SamplingParams:
    """How to pick each output token of one request (defaults follow vLLM).

    Lists given for `stop` or `stop_token_ids` are stored as tuples so that the params can be
    hashed, compared and shipped between workers unchanged.
    """

    max_tokens: int = 16  # output tokens to generate at most
    temperature: float = 1.0  # 0 (or < GREEDY_TEMPERATURE) means greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]; 1 = off
    top_k: int = 0  # most likely tokens kept; 0 or -1 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob; 0 = off
    repetition_penalty: float = 1.0  # HF semantics over prompt + output tokens; 1 = off
    seed: int | None = None  # None: the engine draws one, so every request is reproducible
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the output, besides EOS
    ignore_eos: bool = False  # keep generating past EOS until max_tokens
    logprobs: bool = False  # report the log-probability of each chosen token
    # False: never draft for this request, on a pool with speculative decoding (its output is
    # the same either way; drafting only changes the speed and the pool's compute per token)
    speculative: bool = True

    def __post_init__(self) -> None:
        self.stop = _as_tuple("stop", self.stop)
        self.stop_token_ids = _as_tuple("stop_token_ids", self.stop_token_ids)
        self._check_numbers()
        self._check_stops()

    @property
    def is_greedy(self) -> bool:
        """True when every token is the argmax, so no randomness is involved."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: the token is the raw logits' argmax."""
        return self.is_greedy and self.repetition_penalty == 1.0 and not self.logprobs

    def _check_numbers(self) -> None:
        for name in FLOAT_FIELDS:  # NaN and inf pass some range checks below (inf >= 0)
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if _not_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if _not_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (_not_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        for name in ("ignore_eos", "logprobs", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_stops(self) -> None:
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop strings must be non-empty str, got {text!r}")
        for token_id in self.stop_token_ids:
            if _not_int(token_id) or token_id < 0:
                raise ValueError(f"stop_token_ids must be ints >= 0, got {token_id!r}")


def _as_tuple(name: str, value: object) -> tuple:
    """Accept a tuple or list (a bare string would silently become characters)."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    raise ValueError(f"{name} must be a list or tuple, got {type(value).__name__}")


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
