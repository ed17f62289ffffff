"""The OpenAI-compatible API's response bodies, built from the front end's `TokenEvent`s.

One `ResponseBuilder` per call, of the endpoint's kind, for its `n` choices (one request each):
`chunk(event, index)` is one streamed chunk of choice `index` (the event's new text only:
deltas, never the text so far), `add(event, index)` collects a non-streamed response,
`response()` is that response, `usage_chunk()` the last chunk of a stream with
`stream_options.include_usage` (no choices, only usage: the prompt once, the completions of
every choice). `finish_reason` is set on the chunk of the event that finishes its choice, and
only there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from engine.tokenizer import Tokenizer
from pdserve import __version__
from router.backend import TokenEvent

SYSTEM_FINGERPRINT = f"pdserve-{__version__}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from a prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "pdserve"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None = None  # alternatives are not computed
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ResponseBody(BaseModel):
    """Every completion body and chunk: which call, and its choices (and usage at the end)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[CompletionChoice] | list[ChatChoice] | list[ChatChunkChoice]
    usage: Usage | None = None


@dataclass(slots=True)
class _Collected:
    """What a non-streamed call received, and the counts every call ends with."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, event: TokenEvent, keep_tokens: bool) -> None:
        self.text += event.text
        if keep_tokens:
            self.token_ids += event.token_ids
            self.logprobs += event.logprobs
        self.note(event)

    def note(self, event: TokenEvent) -> None:
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.num_prompt_tokens = event.num_prompt_tokens
            self.num_output_tokens = event.num_output_tokens
            self.num_cached_tokens = event.num_cached_tokens


def _usage(choices: list[_Collected]) -> Usage:
    num_prompt = choices[0].num_prompt_tokens  # every choice has the same prompt
    num_output = sum(c.num_output_tokens for c in choices)
    cached = PromptTokensDetails(cached_tokens=max(c.num_cached_tokens for c in choices))
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_output,
                 total_tokens=num_prompt + num_output, prompt_tokens_details=cached)


class ResponseBuilder:
    """Bodies of one call; subclasses give the endpoint's `object` names and choice shapes."""

    OBJECT = ""
    CHUNK_OBJECT = ""

    def __init__(self, call_id: str, model: str, tokenizer: Tokenizer, logprobs: bool,
                 num_choices: int = 1) -> None:
        self.call_id = call_id
        self.model = model
        self.created = int(time.time())
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self.choices = [_Collected() for _ in range(num_choices)]

    def add(self, event: TokenEvent, index: int = 0) -> None:
        self.choices[index].add(event, self._logprobs)

    def note(self, event: TokenEvent, index: int = 0) -> None:
        """A streamed event: only its finish reason and counts are kept."""
        self.choices[index].note(event)

    def usage_chunk(self) -> ResponseBody:
        return self._body(self.CHUNK_OBJECT, [], _usage(self.choices))

    def _body(self, obj: str, choices: list, usage: Usage | None = None) -> ResponseBody:
        return ResponseBody(id=self.call_id, object=obj, created=self.created, model=self.model,
                            choices=choices, usage=usage)

    def _token_texts(self, token_ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


class CompletionBuilder(ResponseBuilder):
    OBJECT = CHUNK_OBJECT = "text_completion"

    def __init__(self, call_id: str, model: str, tokenizer: Tokenizer, logprobs: bool,
                 num_choices: int = 1) -> None:
        super().__init__(call_id, model, tokenizer, logprobs, num_choices)
        # per choice: characters of token text so far (the logprobs' text offsets)
        self._text_offsets = [0] * num_choices

    def chunk(self, event: TokenEvent, index: int = 0) -> ResponseBody:
        choice = CompletionChoice(
            index=index, text=event.text, finish_reason=event.finish_reason,
            logprobs=self._logprobs_of(event.token_ids, event.logprobs, index))
        return self._body(self.CHUNK_OBJECT, [choice])

    def response(self) -> ResponseBody:
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                    logprobs=self._logprobs_of(c.token_ids, c.logprobs, i))
                   for i, c in enumerate(self.choices)]
        return self._body(self.OBJECT, choices, _usage(self.choices))

    def _logprobs_of(self, token_ids: list[int], logprobs: list[float], index: int
                     ) -> CompletionLogprobs | None:
        if not self._logprobs:
            return None
        tokens = self._token_texts(token_ids)
        offsets = []
        for token in tokens:
            offsets.append(self._text_offsets[index])
            self._text_offsets[index] += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, text_offset=offsets)


class ChatBuilder(ResponseBuilder):
    OBJECT = "chat.completion"
    CHUNK_OBJECT = "chat.completion.chunk"

    def __init__(self, call_id: str, model: str, tokenizer: Tokenizer, logprobs: bool,
                 num_choices: int = 1) -> None:
        super().__init__(call_id, model, tokenizer, logprobs, num_choices)
        self._role_sent = [False] * num_choices

    def chunk(self, event: TokenEvent, index: int = 0) -> ResponseBody:
        delta = ChatDelta(content=event.text)
        if not self._role_sent[index]:
            delta.role, self._role_sent[index] = "assistant", True
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=event.finish_reason,
                                 logprobs=self._logprobs_of(event.token_ids, event.logprobs))
        return self._body(self.CHUNK_OBJECT, [choice])

    def response(self) -> ResponseBody:
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=c.text),
                              finish_reason=c.finish_reason,
                              logprobs=self._logprobs_of(c.token_ids, c.logprobs))
                   for i, c in enumerate(self.choices)]
        return self._body(self.OBJECT, choices, _usage(self.choices))

    def _logprobs_of(self, token_ids: list[int], logprobs: list[float]) -> ChatLogprobs | None:
        if not self._logprobs:
            return None
        return ChatLogprobs(content=[
            ChatTokenLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
            for text, logprob in zip(self._token_texts(token_ids), logprobs)])
