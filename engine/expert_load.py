"""Per-expert token counts of a MoE model, for metrics and GetClusterState.

Each `FusedMoE` layer accumulates, on its device, how many (token, slot) pairs the router sent
to each global expert (`expert_counts`, added on device each step by the routing kernel or
`index_add_`: no host sync). `ExpertLoad` reads them on the engine thread, summed over this
process's MoE layers, at most once every
`interval_s` (one small device-to-host copy then; never per step), and serves that snapshot in
between. Under tensor or expert parallelism every rank routes every token (hidden states are
replicated), so rank 0 - the engine core's process - counts every expert exactly once without
any communication; with pipeline parallelism it counts the MoE layers of its own stage only.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from engine.layers.moe import FusedMoE

DEFAULT_INTERVAL_S = 1.0


class ExpertLoad:
    """A host snapshot of the model's per-expert token totals (since start), refreshed lazily."""

    def __init__(self, model: nn.Module | None, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._layers = ([m for m in model.modules() if isinstance(m, FusedMoE)]
                        if model is not None else [])
        self.interval_s = interval_s
        self.num_experts = self._layers[0].num_experts if self._layers else 0
        self._totals: tuple[int, ...] = (0,) * self.num_experts
        self._read_at = float("-inf")
        for layer in self._layers:  # start counting now, after any warm-up or graph capture
            layer.expert_counts.zero_()

    def totals(self, max_age_s: float | None = None) -> tuple[int, ...]:
        """Tokens routed to each expert since start, summed over layers ((): a dense model);
        read from the device when the snapshot is older than `max_age_s` (default interval_s)."""
        if not self._layers:
            return ()
        now = time.monotonic()
        if now - self._read_at >= (self.interval_s if max_age_s is None else max_age_s):
            total = torch.stack([layer.expert_counts for layer in self._layers]).sum(0)
            self._totals = tuple(total.tolist())
            self._read_at = now
        return self._totals

