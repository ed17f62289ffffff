"""`pdserve serve` and `pdserve client`: filled in by the serving layer."""

from __future__ import annotations


def add_parsers(sub) -> None:
    return None
