"""Stop strings over a stream of text deltas.

A stop string can arrive split across any number of deltas, so the matcher holds back the
longest tail of the pending text that could still grow into a stop string. Everything before
that tail is safe to emit; when a stop string completes, the text before it is emitted and the
stream ends. The stop string itself is never emitted. Among several stop strings the first one
to complete wins, so the result does not depend on how the text was split into deltas.

Matching is linear in the text generated: each stop string has a Knuth-Morris-Pratt automaton
whose state (the longest suffix of the text so far that is a prefix of the stop string) is
advanced one character at a time. Building it costs O(len(stop)); no prefix set is built (a
prefix set of every proper prefix is quadratic: a 1 MiB stop string exhausted a node's memory).
"""

from __future__ import annotations


class _Automaton:
    """KMP over one stop string: `state` is how many of its characters the text ends with."""

    __slots__ = ("stop", "fail", "state")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.fail = _failure_table(stop)
        self.state = 0

    def advance(self, char: str) -> bool:
        """Feed one character; True when the stop string has just completed."""
        stop, state = self.stop, self.state
        while state and stop[state] != char:
            state = self.fail[state - 1]
        if stop[state] == char:
            state += 1
        if state == len(stop):
            self.state = self.fail[state - 1]
            return True
        self.state = state
        return False


def _failure_table(stop: str) -> list[int]:
    """fail[i]: length of the longest proper border of stop[:i + 1]."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    """Feeds text deltas and says what may be emitted and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty str, got {stops!r}")
        self._automata = [_Automaton(stop) for stop in stops]
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has been seen; later deltas are dropped."""
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string has completed)."""
        if self._stopped:
            return "", True
        pending = self._held + delta
        offset = len(self._held)
        for i, char in enumerate(delta):
            # Among stops completing at this character, the longest starts first.
            done = [len(a.stop) for a in self._automata if a.advance(char)]
            if done:
                self._held, self._stopped = "", True
                return pending[:offset + i + 1 - max(done)], True
        held_len = max((a.state for a in self._automata), default=0)
        self._held = pending[len(pending) - held_len:]
        return pending[:len(pending) - held_len], False

    def flush(self) -> str:
        """Release the held-back tail (the request ended for another reason)."""
        held, self._held = self._held, ""
        return held
