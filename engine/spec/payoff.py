"""When speculative decoding pays: `Payoff`, the per-batch-size choice between drafting and
plain decode steps (engine/spec/decoding.py asks it once per step)."""

from __future__ import annotations


class Payoff:
    """Whether drafting pays at a batch size: output tokens per second of verification steps
    against plain decode steps, as moving averages per batch-size bucket (powers of two), each
    mode tried first, then the loser re-probed now and then. A verification costs k + 1
    tokens of compute per request: free while decoding is bandwidth-bound (small batches on a
    GPU), not once it is compute-bound (large batches, or a CPU).

    Probes back off: the first comes `probe_every` steps after the ranking was set, and each
    probe that finds the same winner doubles the gap (up to `max_probe_every`), so a mode that
    keeps losing costs ever less; a probe that flips the ranking starts over at `probe_every`.
    (At acceptance 0 on an H100, a fixed one-in-16 probe left speculative decoding 1-3% slower
    than plain at batch 32, and the backing-off probes still 2-3% in 128-token runs.)

    A probe of drafting is skipped while there is no news: where the proposer drafts on the
    host, plain steps draft too without verifying (engine/spec/shadow.py) and score those
    drafts against the tokens plain decoding then produced, which is exactly what verification
    would have kept. While that shadow acceptance is no higher than the verified acceptance
    drafting lost with (plus `shadow_margin`), a probe would measure the same loss again: it
    is skipped, and the gap doubles as if it had run (`record_acceptance`). Probes at the
    largest gap still run: drafting may also start to pay because verification got cheaper
    (shorter contexts at the same batch size), which acceptance does not show.

    With shadow drafts (`from_shadow`), a batch size does not start by drafting either: it
    decodes plainly until its shadow drafts accept at least `min_shadow_acceptance` (the first
    score comes after about k steps: the shadow passes run every step until then), and only
    then tries drafting. At acceptance 0 it never drafts (an H100 at batch 32 lost 0.5-1% to
    the drafting steps of the start in 128-token runs)."""

    def __init__(self, probe_every: int = 16, weight: float = 0.25,
                 max_probe_every: int = 256, shadow_margin: float = 0.05,
                 min_shadow_acceptance: float = 0.1) -> None:
        if not 1 <= probe_every <= max_probe_every:
            raise ValueError(f"need 1 <= probe_every <= max_probe_every, got {probe_every}, "
                             f"{max_probe_every}")
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.weight = weight
        self._rates: dict[int, dict[bool, float]] = {}  # bucket -> {speculative: tokens/s}
        self._steps: dict[int, int] = {}
        self._probes: dict[int, tuple[int, int, bool]] = {}  # bucket -> (step, gap, winner)
        self.shadow_margin = shadow_margin
        self.min_shadow_acceptance = min_shadow_acceptance
        # bucket -> {shadow: moving average of accepted / drafted}
        self._acceptance: dict[int, dict[bool, float]] = {}

    def wants_drafts(self, batch: int, from_shadow: bool = False) -> bool:
        """Whether a step at this batch size drafts; `from_shadow`: shadow drafts score
        acceptance while it does not (see the class)."""
        bucket = batch.bit_length()
        rates = self._rates.setdefault(bucket, {})
        self._steps[bucket] = step = self._steps.get(bucket, 0) + 1
        if True not in rates and from_shadow:  # plain until shadow drafts would be kept
            shadow = self._acceptance.get(bucket, {}).get(True)
            return shadow is not None and shadow >= self.min_shadow_acceptance
        if True not in rates:  # drafting first (every step until some drafts verify, then
            return step <= self.probe_every or step % self.probe_every == 1  # now and then)
        if False not in rates:
            return False  # then plain decoding
        best = rates[True] >= rates[False]
        last_step, gap, last_best = self._probes.setdefault(bucket, (step, self.probe_every,
                                                                     best))
        if step - last_step < gap:
            return best
        skip = not best and gap < self.max_probe_every and self._no_news(bucket)
        gap = min(2 * gap, self.max_probe_every) if best == last_best else self.probe_every
        self._probes[bucket] = (step, gap, best)
        if skip:
            return False  # drafting would lose as it did: no probe, the gap grows anyway
        return not best  # probe the loser

    def _no_news(self, bucket: int) -> bool:
        """Whether shadow drafts accept no more than the verified drafts did."""
        acceptance = self._acceptance.get(bucket, {})
        return (True in acceptance and False in acceptance
                and acceptance[True] <= acceptance[False] + self.shadow_margin)

    def record_acceptance(self, batch: int, drafted: int, accepted: int, shadow: bool) -> None:
        """Drafts verified by a step (shadow False) or scored against plain decoding's tokens
        (shadow True), at this batch size."""
        if drafted > 0:
            self._average(self._acceptance, batch, shadow, accepted / drafted)

    def needs_shadow(self, batch: int) -> bool:
        """Whether this batch size waits for its first shadow score to decide (shadow passes
        then run every step), within its first steps."""
        bucket = batch.bit_length()
        return (True not in self._acceptance.get(bucket, {})
                and True not in self._rates.get(bucket, {})
                and self._steps.get(bucket, 0) <= self.probe_every)

    def acceptance(self, batch: int) -> dict[bool, float]:
        return dict(self._acceptance.get(batch.bit_length(), {}))

    def record(self, batch: int, speculative: bool, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._average(self._rates, batch, speculative, tokens / seconds)

    def _average(self, tables: dict[int, dict[bool, float]], batch: int, key: bool,
                 value: float) -> None:
        """Fold `value` into the moving average at (batch bucket, key)."""
        table = tables.setdefault(batch.bit_length(), {})
        old = table.get(key)
        table[key] = value if old is None else old + self.weight * (value - old)

    def rates(self, batch: int) -> dict[bool, float]:
        return dict(self._rates.get(batch.bit_length(), {}))
