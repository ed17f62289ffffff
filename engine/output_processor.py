"""Turns sampled tokens into a request's output stream and decides when it ends.

One `RequestStream` per request: it appends tokens, detokenizes incrementally, holds back text
that may be the start of a stop string, and reports the finish reason. Whoever owns a request's
client-facing stream owns its `RequestStream` (the colocated engine, or the decode worker).

A request that resumes after outputs already streamed to the client (a migrated request, see
`LLMEngine.make_request`) gets a stream built exactly like a new one and then `replay`ed with
those outputs: its state (held-back bytes of a partial character, a held-back stop-string
prefix) is then the uninterrupted stream's, so its next delta is too.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.detokenizer import IncrementalDetokenizer
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stop import StopStringMatcher


def stop_token_ids(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> set[int]:
    """The ids whose sampling ends a request with "stop"."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(eos_token_ids)
    return ids


class RequestStream:
    """Incremental text and stop conditions of one request."""

    def __init__(self, request: Request, tokenizer, eos_token_ids: tuple[int, ...]) -> None:
        params = request.params
        self.request = request
        self.stop_ids = stop_token_ids(params, eos_token_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_matcher = StopStringMatcher(tuple(params.stop)) if params.stop else None

    def replay(self, token_ids: Sequence[int]) -> None:
        """Feed outputs the client already has (a resumed request) without emitting anything.
        Raises ValueError if they had already ended the stream (a stop token or stop string)."""
        for index, token_id in enumerate(token_ids):
            if token_id in self.stop_ids:
                raise ValueError(f"output_token_ids[{index}] = {token_id} is a stop token: "
                                 "the request had already finished")
            delta = self.detokenizer.append([token_id])
            if self.stop_matcher is not None and self.stop_matcher.feed(delta)[1]:
                raise ValueError(f"output_token_ids[:{index + 1}] complete a stop string: "
                                 "the request had already finished")

    def on_token(self, token_id: int) -> tuple[str, str | None]:
        """Record one sampled token (already appended to the request); returns the text delta
        it releases and a finish reason ("stop" / "length") or None."""
        if token_id in self.stop_ids:
            return self._flush(), "stop"
        delta = self.detokenizer.append([token_id])
        if self.stop_matcher is not None:
            delta, stopped = self.stop_matcher.feed(delta)
            if stopped:
                return delta, "stop"
        if self._at_length_limit():
            return delta + self._flush(), "length"
        return delta, None

    def _at_length_limit(self) -> bool:
        r = self.request
        return len(r.output_token_ids) >= r.params.max_tokens or r.num_known_tokens >= r.max_model_len

    def _flush(self) -> str:
        tail = self.detokenizer.flush()
        if self.stop_matcher is None:
            return tail
        text, stopped = self.stop_matcher.feed(tail)
        return text if stopped else text + self.stop_matcher.flush()
