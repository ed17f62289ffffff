"""The OpenAI-compatible API's request bodies, and their translation into a `GenerateRequest`.

The HTTP app validates a body with these pydantic models (types: a 400 naming the field), then
`to_generate_request` turns it into the same `GenerateRequest` a gRPC client sends, so both
transports share one validation (router/validation.py) from there on.

Field policy, as the OpenAI API does it: unknown fields are ignored; fields we know but do not
implement are refused with a message naming them when they ask for something (`echo`,
`suffix`, `best_of` > 1, penalties other than 0, `logit_bias`, tools, JSON response formats,
top-logprob alternatives: the engine returns the sampled token's logprob only), and accepted
when they hold their no-op value (`presence_penalty: 0`, `response_format: text`, ...).

`n` choices (at most MAX_CHOICES) are `n` requests of their own (`generate_requests`), ids
`<call id>-<i>`, each with its own seed: the client's seed + i, else one drawn per request.
"""

from __future__ import annotations

from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict

from engine.sampling_params import MAX_SEED
from protos.pdserve.v1 import generation_pb2
from router.errors import InvalidRequestError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions API's default
MAX_CHOICES = 16  # `n`: each choice is a request of its own
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                    "ignore_eos", "speculative")


class StreamOptions(BaseModel):
    """`stream_options`: with `include_usage`, one last chunk carries usage and no choices."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields both endpoints share (vLLM's extensions `top_k`, `min_p`,
    `repetition_penalty` and `ignore_eos` included, and pdserve's `speculative`: false opts the
    request out of its decode pool's speculative decoding)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    speculative: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    cache_salt: str | None = None  # vLLM's extension: a prefix-cache namespace (validation.py)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        """Refuse the known fields that ask for what the engine does not do."""
        if self.stream_options is not None and not self.stream:
            _refuse("stream_options", "is only allowed with stream: true")
        if self.n is not None and not 1 <= self.n <= MAX_CHOICES:
            _refuse("n", f"must be in [1, {MAX_CHOICES}], got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                _refuse(name, "is not supported (only 0); use repetition_penalty")
        if self.logit_bias:
            _refuse("logit_bias", "is not supported")

    def generate_requests(self, call_id: str) -> list[generation_pb2.GenerateRequest]:
        """One GenerateRequest per choice (see the module docstring)."""
        first = self.to_generate_request(call_id)
        if self.cache_salt is not None:
            first.cache_salt = self.cache_salt
        num_choices = self.n or 1
        if num_choices == 1:
            return [first]
        requests = []
        for index in range(num_choices):
            request = generation_pb2.GenerateRequest()
            request.CopyFrom(first)
            request.request_id = f"{call_id}-{index}"
            if self.seed is not None:
                request.sampling.seed = (self.seed + index) % MAX_SEED
            requests.append(request)
        return requests

    def sampling(self, max_tokens: int | None, logprobs: bool) -> generation_pb2.SamplingParams:
        """The proto's sampling fields; a value the proto cannot hold is a 400 naming it."""
        sampling = generation_pb2.SamplingParams()
        values: dict[str, Any] = {name: getattr(self, name) for name in _SAMPLING_FIELDS}
        values["max_tokens"] = max_tokens
        values["logprobs"] = logprobs or None
        for name, value in values.items():
            if value is None:
                continue
            try:
                setattr(sampling, name, value)
            except (ValueError, TypeError):  # out of the proto field's range (negative, huge)
                _refuse(name, f"value {value!r} is out of range")
        sampling.stop.extend(_stop_strings(self.stop))
        return sampling


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`: a prompt as text or as token ids (one prompt per request)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None  # 0: the sampled token's logprob; alternatives are refused
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and self.logprobs != 0:
            _refuse("logprobs", f"only 0 is supported (the sampled token's logprob, no "
                                f"alternatives), got {self.logprobs}")
        if self.echo:
            _refuse("echo", "is not supported")
        if self.suffix:
            _refuse("suffix", "is not supported")
        if self.best_of is not None and self.best_of != 1:
            _refuse("best_of", "only best_of = 1 is supported")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def to_generate_request(self, request_id: str) -> generation_pb2.GenerateRequest:
        self.check_supported()
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        request = generation_pb2.GenerateRequest(
            request_id=request_id, sampling=self.sampling(max_tokens, self.logprobs is not None))
        prompt = _single_prompt(self.prompt)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            try:
                request.prompt_token_ids.token_ids.extend(prompt)
            except (ValueError, TypeError):
                _refuse("prompt", "token ids must be integers >= 0")
        return request


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`: messages rendered by the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            _refuse("top_logprobs", "only 0 is supported: the engine returns the sampled "
                                    "token's logprob only (logprobs: true)")
        if self.tools or self.functions:
            _refuse("tools" if self.tools else "functions", "tool calls are not supported")
        if self.tool_choice not in (None, "none"):
            _refuse("tool_choice", "tool calls are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            _refuse("response_format", "only {\"type\": \"text\"} is supported")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    def to_generate_request(self, request_id: str) -> generation_pb2.GenerateRequest:
        self.check_supported()
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens  # None: the router's default (router/validation.py)
        request = generation_pb2.GenerateRequest(
            request_id=request_id, sampling=self.sampling(max_tokens, self.logprobs))
        request.messages.SetInParent()
        for index, message in enumerate(self.messages):
            request.messages.messages.add(role=message.role,
                                          content=_message_text(message.content, index))
        return request


def _message_text(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            _refuse(f"messages[{index}].content[{part_index}]",
                    f"only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, "
                    f"got type {part.type[:32]!r}")
        texts.append(part.text)
    return "".join(texts)


def _single_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], (str, list)):  # a batch of prompts
        if len(prompt) != 1:
            _refuse("prompt", f"batches of prompts are not supported (got {len(prompt)}); send "
                              "one request per prompt")
        return prompt[0]
    return prompt


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _refuse(field: str, message: str) -> NoReturn:
    raise InvalidRequestError(field, message)
