"""Turn a client's `GenerateRequest` into a backend's `GenerationInput`, or say what is wrong.

Every rejection is an `InvalidRequestError` whose `field` names the request field to fix:
`input`, `prompt`, `messages`, `messages[i].role`, `prompt_token_ids`, `request_id` or
`sampling.<name>`; a request whose bytes did not parse (`router.wire.MalformedRequest`) is
rejected with the error the parser found.

The API's bounds (README "Limits"), each checked before any costly work:
- `request_id`: at most MAX_REQUEST_ID_CHARS characters of `[A-Za-z0-9._:-]` (it is echoed in
  every response and written to logs);
- `sampling.stop`: at most MAX_STOP_STRINGS strings of MAX_STOP_BYTES UTF-8 bytes in total;
- `prompt` / `messages`: at most PROMPT_BYTES_PER_TOKEN x context length UTF-8 bytes of text
  (message contents summed), checked before tokenizing: a prompt that long could not fit the
  context anyway unless its tokens average more than 8 bytes, and tokenizing megabytes first
  would cost seconds;
- `cache_salt`: 1 to MAX_CACHE_SALT_CHARS printable ASCII characters when set (it names a
  prefix-cache namespace: requests share cached KV blocks only with requests of the same salt);
- chat roles: CHAT_ROLES only. `tool` is not accepted: the API has no tool-call fields, so an
  assistant's tool call, which a tool message answers, cannot be expressed.

Server defaults for absent `optional` sampling fields are `SamplingParams`' own (temperature 1.0,
top_p 1.0, top_k off, ... like vLLM), except `max_tokens`, which defaults to DEFAULT_MAX_TOKENS
(SamplingParams' 16 suits offline tests, not a chat reply). A proto `top_k` <= 0 means "off".
An absent seed is drawn here, once, so that every worker that samples for the request (prefill
and decode) uses the same one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import uuid
from collections.abc import Callable, Container, Sequence
from typing import TypeVar

from engine.sampling_params import MAX_SEED, SamplingParams
from engine.tokenizer import Tokenizer
from protos.convert import sampling_from_proto
from protos.pdserve.v1 import generation_pb2
from router.backend import GenerationInput
from router.errors import DuplicateRequestError, InvalidRequestError
from router.wire import MalformedRequest

DEFAULT_MAX_TOKENS = 256  # output tokens when the client sets no max_tokens
TOKENIZE_INLINE_MAX_CHARS = 2048  # longer texts are tokenized in a thread, off the event loop
MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 4096  # all stop strings together, UTF-8
PROMPT_BYTES_PER_TOKEN = 8  # prompt text bound: this many bytes per token of context
CHAT_ROLES = ("system", "user", "assistant")
MAX_DRAIN_TIMEOUT_S = 3600.0  # DrainInstance's timeout_s
MAX_CACHE_SALT_CHARS = 256

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")

_SAMPLING_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_LEADING_NAME = re.compile(r"[a-z_]+")
_T = TypeVar("_T")


class RequestValidator:
    """Checks requests against one served model: its tokenizer, context length and vocabulary."""

    def __init__(self, tokenizer: Tokenizer, model_info: generation_pb2.ModelInfo) -> None:
        self._tokenizer = tokenizer
        self._context_length = model_info.context_length
        self._vocab_size = model_info.vocab_size

    @property
    def max_prompt_bytes(self) -> int:
        """The most UTF-8 bytes of prompt text (or of all message contents) a request may hold."""
        return PROMPT_BYTES_PER_TOKEN * self._context_length

    async def to_input(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                       in_flight: Container[str], arrival_time_s: float,
                       deadline_s: float | None) -> GenerationInput:
        """Validate `request`; its request_id must not be in `in_flight`.

        The uniqueness check runs last, after the only await, so a caller that registers the id
        right after this returns (no await in between) can never admit a duplicate.
        """
        if isinstance(request, MalformedRequest):
            raise request.error
        request_id = _request_id(request)
        cache_salt = _cache_salt(request)
        _check_stop_strings(request.sampling.stop)
        params = sampling_params(request.sampling)
        prompt_ids = await self._prompt_token_ids(request)
        if request_id in in_flight:
            raise DuplicateRequestError(request_id)
        return GenerationInput(request_id, prompt_ids, params, params.seed, arrival_time_s,
                               deadline_s, cache_salt)

    async def _prompt_token_ids(self, request: generation_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequestError("input", "one of prompt, messages or prompt_token_ids is required")
        if kind == "prompt_token_ids":
            ids = list(request.prompt_token_ids.token_ids)
        elif kind == "prompt":
            ids = await self._tokenize_prompt(request.prompt)
        else:
            ids = await self._tokenize_messages(request.messages.messages)
        self._check_prompt(kind, ids)
        return ids

    async def _tokenize_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        self._check_text_bytes("prompt", [prompt])
        return await _off_loop_if_long(self._tokenizer.encode, prompt, len(prompt))

    async def _tokenize_messages(self, messages: Sequence[generation_pb2.ChatMessage]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages", "must contain at least one message")
        for index, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{index}].role",
                                          f"unknown role {message.role[:32]!r}; allowed roles: "
                                          f"{', '.join(CHAT_ROLES)}")
        self._check_text_bytes("messages", [m.content for m in messages])
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        num_chars = sum(len(m.content) for m in messages)
        try:
            return await _off_loop_if_long(self._tokenizer.apply_chat_template, as_dicts, num_chars)
        except ValueError as error:
            raise InvalidRequestError("messages", str(error)) from None

    def _check_text_bytes(self, field: str, texts: Sequence[str]) -> None:
        limit = self.max_prompt_bytes
        # A str has at most as many characters as UTF-8 bytes: count characters first, so a
        # huge text is refused without encoding it.
        if sum(len(text) for text in texts) > limit or _utf8_len(texts) > limit:
            raise InvalidRequestError(field, f"is longer than {limit} UTF-8 bytes "
                                             f"({PROMPT_BYTES_PER_TOKEN} per token of the "
                                             f"context length {self._context_length})")

    def _check_prompt(self, field: str, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError(field, "must contain at least one token")
        if max(ids) >= self._vocab_size:
            raise InvalidRequestError(field, f"token ids must be < the vocabulary size "
                                             f"{self._vocab_size}, got {max(ids)}")
        if len(ids) >= self._context_length:
            raise InvalidRequestError(field, f"is {len(ids)} tokens; the model's context length "
                                             f"is {self._context_length}, leaving no room to generate")


def sampling_params(sampling: generation_pb2.SamplingParams) -> SamplingParams:
    """Engine sampling params from the proto: server defaults for absent fields, seed resolved."""
    defaults = {"max_tokens": DEFAULT_MAX_TOKENS, "seed": random.randrange(MAX_SEED)}
    try:
        return sampling_from_proto(sampling, defaults)
    except ValueError as error:
        raise InvalidRequestError(f"sampling.{_field_named_in(str(error))}", str(error)) from None


def _field_named_in(message: str) -> str:
    """SamplingParams' errors start with the field's name ("top_p must be ...")."""
    match = _LEADING_NAME.match(message)
    return match.group() if match and match.group() in _SAMPLING_FIELD_NAMES else "params"


def _check_stop_strings(stop: Sequence[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, "
                                                   f"got {len(stop)}")
    if sum(len(s) for s in stop) > MAX_STOP_BYTES or _utf8_len(stop) > MAX_STOP_BYTES:
        raise InvalidRequestError("sampling.stop", f"stop strings may hold at most "
                                                   f"{MAX_STOP_BYTES} UTF-8 bytes in total")


def _utf8_len(texts: Sequence[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


def _request_id(request: generation_pb2.GenerateRequest) -> str:
    return _optional_text(request, "request_id", MAX_REQUEST_ID_CHARS, _REQUEST_ID,
                          "may contain only letters, digits and . _ : -") or uuid.uuid4().hex


def _cache_salt(request: generation_pb2.GenerateRequest) -> str:
    return _optional_text(request, "cache_salt", MAX_CACHE_SALT_CHARS, _PRINTABLE_ASCII,
                          "may contain only printable ASCII characters")


def _optional_text(request: generation_pb2.GenerateRequest, field: str, max_chars: int,
                   allowed: re.Pattern, rule: str) -> str:
    """An optional string field: "" when unset; set, it must be non-empty, at most
    `max_chars` long and match `allowed` (else `rule` names what it may hold)."""
    if not request.HasField(field):
        return ""
    value = getattr(request, field)
    if not value:
        raise InvalidRequestError(field, "must not be empty when set")
    if len(value) > max_chars:
        raise InvalidRequestError(field, f"must be at most {max_chars} characters, "
                                         f"got {len(value)}")
    if not allowed.fullmatch(value):
        raise InvalidRequestError(field, rule)
    return value


async def _off_loop_if_long(fn: Callable[[object], _T], argument: object, num_chars: int) -> _T:
    if num_chars <= TOKENIZE_INLINE_MAX_CHARS:
        return fn(argument)
    return await asyncio.to_thread(fn, argument)


def validate_drain(request: generation_pb2.DrainInstanceRequest) -> float | None:
    """A DrainInstance request's timeout (None: the server's); its fields bounded."""
    instance_id = request.instance_id
    if not instance_id or len(instance_id) > MAX_REQUEST_ID_CHARS \
            or not _REQUEST_ID.fullmatch(instance_id):
        raise InvalidRequestError("instance_id", "must name an instance as GetClusterState does "
                                  f"(1-{MAX_REQUEST_ID_CHARS} characters of [A-Za-z0-9._:-])")
    if not request.HasField("timeout_s"):
        return None
    timeout_s = request.timeout_s
    if not (math.isfinite(timeout_s) and 0.0 <= timeout_s <= MAX_DRAIN_TIMEOUT_S):
        raise InvalidRequestError("timeout_s", f"must be in [0, {MAX_DRAIN_TIMEOUT_S:g}] seconds, "
                                  f"got {timeout_s}")
    return timeout_s
