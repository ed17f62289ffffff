"""Text to token ids and back, for one model, through a transformers fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class Tokenizer:
    """Encodes prompts and chats, decodes generated ids, and knows which ids end generation.

    A GGUF file's is built by engine/loader/gguf_loader.py (converted once per machine).
    """

    def __init__(
        self, hf_tokenizer: PreTrainedTokenizerBase, name: str, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self._hf = hf_tokenizer
        self._name = name
        own_eos = () if hf_tokenizer.eos_token_id is None else (hf_tokenizer.eos_token_id,)
        self._eos_token_ids = tuple(dict.fromkeys((*eos_token_ids, *own_eos)))

    @classmethod
    def from_folder(cls, folder: Path, name: str, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Load the tokenizer files of an HF model folder."""
        if not any((folder / file).is_file() for file in _TOKENIZER_FILES):
            raise ValueError(
                f"{folder} has no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}"
            )
        return cls(AutoTokenizer.from_pretrained(str(folder)), name, eos_token_ids)

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        """The wrapped transformers tokenizer (to save it, or to compare against)."""
        return self._hf

    @property
    def name(self) -> str:
        return self._name

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the model config's eos ids plus the tokenizer's eos id."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added special tokens included."""
        return len(self._hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._hf.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` rendered by the model's chat template, ready for a reply."""
        if not self.has_chat_template:
            raise ValueError(f"model {self._name!r} has no chat template; send a plain prompt")
        _check_messages(messages)
        try:
            rendered = self._hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except jinja2.TemplateError as error:
            raise ValueError(
                f"chat template of {self._name!r} rejected the messages: {error}"
            ) from None
        # transformers 5 returns a BatchEncoding here; older versions return the id list.
        ids = rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
        return [int(token_id) for token_id in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise ValueError(
                f"messages[{index}] must have str 'role' and 'content', got {message!r}"
            )
