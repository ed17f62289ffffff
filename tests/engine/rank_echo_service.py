"""A rank service for tests/engine/test_rank_calls.py: echoes, raises, emits, and records the
plans it saw between calls (imported by rank processes, so it lives in its own module)."""

from __future__ import annotations

from engine.executor.rank_calls import RankContext


class EchoService:
    def __init__(self, ctx: RankContext) -> None:
        self._ctx = ctx
        self._plans_seen = 0
        self._marks: list[tuple[str, int]] = []

    def call(self, name: str, args: tuple):
        if name == "echo":
            return {"rank": self._ctx.rank, "args": list(args), "layout": self._ctx.layout,
                    "kv_shape": list(self._ctx.kv_cache.shape)}
        if name == "mark":  # inline: how many plans ran before it
            self._marks.append((args[0], self._plans_seen))
            return None
        if name == "marks":
            return self._marks
        if name == "emit":
            self._ctx.emit("note", {"rank": self._ctx.rank, "text": args[0]})
            return None
        raise ValueError(f"no call {name!r}")

    def layer_listener(self):
        return None

    def after_plan(self) -> None:
        self._plans_seen += 1

    def close(self) -> None:
        pass
