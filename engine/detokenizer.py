"""Streaming token ids to text, one delta per step, without ever emitting half a character.

Byte-level BPE splits a multi-byte UTF-8 character across tokens; decoding such a token alone
gives U+FFFD. The detokenizer keeps a short window of recent ids and two offsets into it:

    window:  [ ... context ... | ... not yet emitted ... ]
              ^ 0 (prefix)      ^ read_offset

It decodes the window twice (context alone, context + new ids) and emits the difference only
when the decoded text no longer ends in U+FFFD. Decoding the context as well keeps
tokenizer-dependent spacing right. After emitting, the window slides so that the last emitted
ids become the new context: the cost per token stays O(1) in the output length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt ids kept as context for the first output tokens


class Decoder(Protocol):
    """The only tokenizer method the detokenizer needs (HF tokenizers satisfy it)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas; concatenated deltas (plus `flush`)
    equal `tokenizer.decode(all_output_ids)` whenever that text has no U+FFFD of its own.

    `prompt_token_ids`, if given, seeds the window with the prompt's last few ids so the first
    output tokens decode with the spacing they have in context (SentencePiece tokenizers drop
    a leading space at the start of a decode); none of the prompt text is emitted.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window_ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._window_ids)  # ids before this are context, emitted
        self._context_text = self._decode(self._window_ids)

    def append(self, token_ids: Sequence[int]) -> str:
        """Add new output ids; return the text that is now complete (maybe empty)."""
        self._window_ids.extend(token_ids)
        text = self._decode(self._window_ids)
        if len(text) <= len(self._context_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing visible yet, or a character still waits for its bytes
        delta = text[len(self._context_text):]
        self._slide()
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (an unfinished character decodes as U+FFFD)."""
        text = self._decode(self._window_ids)
        delta = text[len(self._context_text):]
        self._slide()
        return delta

    def _slide(self) -> None:
        """Make the ids emitted last the context of the next decode."""
        self._window_ids = self._window_ids[self._read_offset:]
        self._read_offset = len(self._window_ids)
        self._context_text = self._decode(self._window_ids)

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
