"""Stop-string matching: linear in the text (a 1 MiB stop string is cheap), and the same answer
as a whole-text search however the text is split into deltas."""

from __future__ import annotations

import random
import time

from engine.stop import StopStringMatcher


def _reference(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The first stop to complete (then the longest) in the whole text, found by brute force."""
    hits = [(pos + len(s), pos) for s in stops if (pos := text.find(s)) >= 0]
    if not hits:
        return text, False
    return text[:min(hits)[1]], True


def _stream(text: str, stops: tuple[str, ...], rng: random.Random) -> tuple[str, bool]:
    matcher, out, i = StopStringMatcher(stops), [], 0
    while i < len(text):
        n = rng.randint(1, 5)
        emitted, stopped = matcher.feed(text[i:i + n])
        out.append(emitted)
        i += n
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_random_splits_match_whole_text_search():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 40)))
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 5)))
                      for _ in range(rng.randint(1, 3)))
        assert _stream(text, stops, rng) == _reference(text, stops), (text, stops)


def test_one_mib_stop_string_is_linear():
    stop = "a" * (1 << 20)
    started = time.monotonic()
    matcher = StopStringMatcher((stop,))
    for _ in range(2000):
        emitted, stopped = matcher.feed("a")
        assert emitted == "" and not stopped  # every 'a' may still grow into the stop
    emitted, stopped = matcher.feed("b")
    assert emitted == "a" * 2000 + "b" and not stopped
    assert time.monotonic() - started < 10.0  # the prefix-set version needed ~10^12 characters
