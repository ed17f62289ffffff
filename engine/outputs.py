"""Typed results an engine hands to its caller, per step and per finished request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    """What one step added to one request's stream."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    new_logprobs: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


def merge_outputs(parts: list[RequestOutput]) -> RequestOutput:
    """One output for several tokens appended to one request in one step (speculative
    decoding): tokens, text and logprobs in order; finish state and counts of the last."""
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    return RequestOutput(last.request_id, [t for p in parts for t in p.new_token_ids],
                         "".join(p.text_delta for p in parts), last.finished, last.finish_reason,
                         [lp for p in parts for lp in p.new_logprobs], last.num_prompt_tokens,
                         last.num_output_tokens)


@dataclass(slots=True)
class CompletionOutput:
    """A whole finished generation, as returned by `LLMEngine.generate`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)

    def to_json_dict(self) -> dict:
        return {"prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason}
