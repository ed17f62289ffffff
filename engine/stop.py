"""Stop strings over a stream of text deltas.

A stop string can arrive split across any number of deltas, so the matcher holds back the
longest tail of the pending text that could still grow into a stop string. Everything before
that tail is safe to emit; when a stop string completes, the text before it is emitted and the
stream ends. The stop string itself is never emitted. Among several stop strings the first one
to complete wins, so the result does not depend on how the text was split into deltas.
"""

from __future__ import annotations


class StopStringMatcher:
    """Feeds text deltas and says what may be emitted and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty str, got {stops!r}")
        self._stops = tuple(stops)
        self._proper_prefixes = {stop[:n] for stop in stops for n in range(1, len(stop))}
        self._max_held = max((len(stop) - 1 for stop in stops), default=0)
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
        stop_at = self._earliest_stop(pending)
        if stop_at is not None:
            self._held, self._stopped = "", True
            return pending[:stop_at], True
        held_len = self._held_length(pending)
        self._held = pending[len(pending) - held_len:]
        return pending[:len(pending) - held_len], False

    def flush(self) -> str:
        """Release the held-back tail (the request ended for another reason)."""
        held, self._held = self._held, ""
        return held

    def _earliest_stop(self, text: str) -> int | None:
        """Start of the stop string that completes first (then the longest of those): the
        answer a character-by-character stream would give, whatever the delta sizes."""
        matches = [(pos + len(stop), pos) for stop in self._stops if (pos := text.find(stop)) >= 0]
        return min(matches)[1] if matches else None

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(self._max_held, len(text)), 0, -1):
            if text[-length:] in self._proper_prefixes:
                return length
        return 0
