"""Tokenizer tests: our ids must equal transformers' own, for GGUF files and HF folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.loader import default_gguf_path, open_model
from engine.tokenizer import Tokenizer
from tests.engine.factories import default_hf_tokenizer, save_tiny_hf_model

TEXTS = [
    "Hello, world!",
    "Hello , world !  two  spaces\n\ttab and trailing space ",
    "héllo wörld, ça va? ñandú",
    "Привет, как дела?",
    "你好，世界。今天天气很好。",
    "こんにちは、世界",
    "مرحبا بالعالم",
    "emoji 🙂🚀 and symbols ∑∫ ≠ ≤",
    "code: def f(x):\n    return x ** 2  # comment",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in French?"},
    ],
    [{"role": "user", "content": "Traduis « bonjour » en 日本語."}],
]
IM_END_ID = 2


@pytest.fixture(scope="module")
def default_tokenizer() -> Tokenizer:
    return open_model("default").load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """transformers' own tokenizer for the default GGUF, converted from the file now (ours comes
    from the on-disk cache of engine/loader/tokenizer_cache.py once any process converted it)."""
    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    default_hf_tokenizer().save_pretrained(folder)
    return folder


def reference_chat_ids(hf_tokenizer, messages) -> list[int]:
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"])


# --- the default model (tokenizer built from GGUF metadata) -------------------------------------

def test_default_tokenizer_properties(default_tokenizer):
    assert default_tokenizer.name == "SmolLM2-135M-Instruct"
    assert default_tokenizer.vocab_size == 49152
    assert default_tokenizer.bos_token_id == 1
    assert default_tokenizer.eos_token_ids == (IM_END_ID,)
    assert default_tokenizer.has_chat_template


def test_cached_tokenizer_is_the_fresh_conversion(default_tokenizer, reference):
    ours = default_tokenizer.hf_tokenizer
    assert ours.get_vocab() == reference.get_vocab()
    assert ours.all_special_tokens == reference.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert ours.chat_template == reference.chat_template


def test_chat_reply_ends_on_im_end(default_tokenizer):
    assert default_tokenizer.encode("<|im_end|>", add_special_tokens=False) == [IM_END_ID]
    assert IM_END_ID in default_tokenizer.eos_token_ids


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(default_tokenizer, reference, text, add_special_tokens):
    ids = default_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert ids == reference.encode(text, add_special_tokens=add_special_tokens)
    assert all(type(token_id) is int for token_id in ids)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(default_tokenizer, reference, messages):
    ids = default_tokenizer.apply_chat_template(messages)
    assert type(ids) is list and all(type(token_id) is int for token_id in ids)
    assert ids == reference_chat_ids(reference, messages)
    reply_prompt = default_tokenizer.decode(ids[-4:], skip_special_tokens=False)
    assert reply_prompt == "<|im_start|>assistant\n"


def test_chat_template_adds_default_system_prompt(default_tokenizer):
    text = default_tokenizer.decode(default_tokenizer.apply_chat_template(CHATS[0]), False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(default_tokenizer, text):
    assert default_tokenizer.decode(default_tokenizer.encode(text)) == text


def test_decode_skips_special_tokens_unless_asked(default_tokenizer):
    ids = default_tokenizer.apply_chat_template(CHATS[0])
    assert "<|im_start|>" not in default_tokenizer.decode(ids)
    assert "<|im_start|>" in default_tokenizer.decode(ids, skip_special_tokens=False)


# --- HF folders ---------------------------------------------------------------------------------

def test_folder_tokenizer_matches_transformers(tokenizer_dir):
    ours = Tokenizer.from_folder(tokenizer_dir, name="tiny")
    theirs = AutoTokenizer.from_pretrained(tokenizer_dir)
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == reference_chat_ids(theirs, messages)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)


def test_tiny_model_tokenizer_merges_config_eos_ids(tmp_path):
    folder = save_tiny_hf_model(tmp_path / "tiny", "qwen3", tie_word_embeddings=True)
    (folder / "generation_config.json").write_text('{"eos_token_id": [7, 2]}')
    tokenizer = open_model(folder).load_tokenizer()
    assert tokenizer.name == "tiny"
    assert tokenizer.eos_token_ids == (2, 7)


def test_eos_ids_are_the_union_of_config_and_tokenizer(tokenizer_dir):
    tokenizer = Tokenizer.from_folder(tokenizer_dir, name="tiny", eos_token_ids=(5, 2))
    assert tokenizer.eos_token_ids == (5, 2)


# --- errors -------------------------------------------------------------------------------------

def test_missing_chat_template_is_a_value_error(tokenizer_dir, tmp_path):
    for file in tokenizer_dir.iterdir():
        if file.name != "chat_template.jinja":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    tokenizer = Tokenizer.from_folder(tmp_path, name="plain")
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="'plain' has no chat template"):
        tokenizer.apply_chat_template(CHATS[0])


def test_template_errors_are_value_errors(tokenizer_dir):
    tokenizer = Tokenizer.from_folder(tokenizer_dir, name="strict")
    tokenizer.hf_tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        tokenizer.apply_chat_template(CHATS[0])


MALFORMED_CHATS = [[], "hi", [{"role": "user"}], [{"role": "user", "content": 3}]]


@pytest.mark.parametrize("messages", MALFORMED_CHATS)
def test_malformed_messages_are_rejected(default_tokenizer, messages):
    with pytest.raises(ValueError, match="messages"):
        default_tokenizer.apply_chat_template(messages)


def test_encode_rejects_non_text(default_tokenizer):
    with pytest.raises(ValueError, match="must be a str"):
        default_tokenizer.encode(b"bytes")


def test_folder_without_tokenizer_files_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer"):
        Tokenizer.from_folder(tmp_path, name="none")
