"""Failure injection for the KV sender, set by configuration (tests, chaos runs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Ways a KVSender can misbehave on purpose; the default injects nothing."""

    # go silent after this many layers of a transfer: nothing more is sent on that link
    drop_after_layers: int | None = None
    delay_s: float = 0.0  # sleep before each KV message (a slow or stalled link)
    corrupt_header: bool = False  # send headers whose request hash is wrong

    def __post_init__(self) -> None:
        if self.drop_after_layers is not None and self.drop_after_layers < 0:
            raise ValueError(f"drop_after_layers must be >= 0, got {self.drop_after_layers}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")

    def drops(self, layers_sent: int, group_size: int) -> bool:
        """Whether a group of `group_size` layers after `layers_sent` is silently dropped."""
        limit = self.drop_after_layers
        return limit is not None and layers_sent + group_size > limit


NO_FAULTS = FaultInjection()
