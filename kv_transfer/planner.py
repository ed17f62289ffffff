"""Which prefill rank sends which KV shard to which decode rank (pure functions, no I/O).

A *KV shard* is a layer range x a KV-head range of a request's blocks, in model coordinates
(global layer and head indices). Each rank of an instance holds one shard of every request:
its pipeline stage's layers x its tensor rank's KV heads (`engine.parallel`: rank =
pp_rank * tp + tp_rank; tp <= heads splits them contiguously, tp > heads replicates each head
on tp / heads consecutive ranks). The plan of a transfer between a prefill layout and a decode
layout is one message per (prefill rank, decode rank) pair that exchanges data:

    for each decode rank d (its layers L_d x heads H_d):
      for each prefill stage s whose layers meet L_d:         layers = L_s & L_d
        for each head h of H_d: its holders in stage s; the one read is
            holders[tp_rank(d) % len(holders)]                  (one replica, spread over d)
        consecutive heads read from the same prefill rank -> one message

So a replicated prefill head is read from exactly one replica per receiver, and a head that
the decode replicates reaches each of its decode ranks. A pair exchanges at most one shard
(the intersection of two rectangles is a rectangle), so each pair channel carries one message
group per transfer, and both ends derive the same plan from the two layouts alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel import ParallelContext, kv_heads_of_rank, split_layers


@dataclass(frozen=True, slots=True)
class ParallelLayout:
    """An instance's tensor x pipeline layout, as announced at the KV handshake."""

    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    stage_layers: tuple[int, ...] | None = None  # layers per stage; None = the even split

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"ParallelLayout tp and pp must be >= 1, got tp={self.tp} "
                             f"pp={self.pp}")
        if self.stage_layers is not None and len(self.stage_layers) != self.pp:
            raise ValueError(f"ParallelLayout.stage_layers {list(self.stage_layers)} must name "
                             f"{self.pp} stages")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def name(self) -> str:
        """"tp=2 pp=1", plus " stages=3+5" for an uneven pipeline split (parse() reads it)."""
        text = f"tp={self.tp} pp={self.pp}"
        if self.stage_layers is not None:
            text += " stages=" + "+".join(str(n) for n in self.stage_layers)
        return text

    @classmethod
    def parse(cls, text: str) -> ParallelLayout:
        """The inverse of `name`; ValueError naming what is wrong."""
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
        if set(fields) - {"tp", "pp", "stages"} or len(fields) != len(text.split()) or \
                not {"tp", "pp"} <= set(fields):
            raise ValueError(f"parallel layout must read 'tp=N pp=M [stages=a+b]', got {text!r}")
        try:
            stages = (tuple(int(n) for n in fields["stages"].split("+"))
                      if "stages" in fields else None)
            return cls(int(fields["tp"]), int(fields["pp"]), stages)
        except ValueError as exc:
            raise ValueError(f"parallel layout {text!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class KVShard:
    """Layers [layers[0], layers[1]) x KV heads [heads[0], heads[1]), model coordinates."""

    layers: tuple[int, int]
    heads: tuple[int, int]

    def __post_init__(self) -> None:
        for name, (start, end) in (("layers", self.layers), ("heads", self.heads)):
            if not 0 <= start < end:
                raise ValueError(f"KVShard.{name} [{start}, {end}) must be a non-empty range")

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    def contains(self, other: KVShard) -> bool:
        return (self.layers[0] <= other.layers[0] and other.layers[1] <= self.layers[1]
                and self.heads[0] <= other.heads[0] and other.heads[1] <= self.heads[1])

    def __str__(self) -> str:
        return (f"layers [{self.layers[0]}, {self.layers[1]}) x heads "
                f"[{self.heads[0]}, {self.heads[1]})")


@dataclass(frozen=True, slots=True)
class ShardMessage:
    """One pair's part of a transfer: `prefill_rank` sends `shard` to `decode_rank`."""

    prefill_rank: int
    decode_rank: int
    shard: KVShard


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the plan needs of the model: its decoder layers and KV heads."""

    num_layers: int
    num_kv_heads: int


def layout_problems(layout: ParallelLayout, model: ModelShape, role: str) -> list[str]:
    """Why `layout` cannot hold the model (heads or layers that do not split); empty if it can."""
    try:
        kv_heads_of_rank(model.num_kv_heads, ParallelContext(tp_size=layout.tp))
        split_layers(model.num_layers, layout.pp, layout.stage_layers)
    except ValueError as exc:
        return [f"{role} layout {layout.name}: {exc}"]
    return []


def rank_shard(layout: ParallelLayout, model: ModelShape, rank: int) -> KVShard:
    """The shard rank `rank` of an instance of `layout` holds (its stage x its heads)."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} is outside layout {layout.name}")
    stage, tp_rank = divmod(rank, layout.tp)
    layers = split_layers(model.num_layers, layout.pp, layout.stage_layers)[stage]
    first, count = kv_heads_of_rank(model.num_kv_heads,
                                    ParallelContext(tp_rank=tp_rank, tp_size=layout.tp))
    return KVShard(layers, (first, first + count))


def plan_transfer(prefill: ParallelLayout, decode: ParallelLayout,
                  model: ModelShape) -> tuple[ShardMessage, ...]:
    """Every (prefill rank, decode rank, shard) message of one transfer, ordered by decode rank
    then layers then heads. ValueError naming the layout when one cannot hold the model."""
    problems = (layout_problems(prefill, model, "prefill")
                + layout_problems(decode, model, "decode"))
    if problems:
        raise ValueError("; ".join(problems))
    messages = []
    for decode_rank in range(decode.world_size):
        messages += _messages_into(prefill, model, decode_rank, rank_shard(decode, model,
                                                                           decode_rank),
                                   decode_rank % decode.tp)
    return tuple(messages)


def _messages_into(prefill: ParallelLayout, model: ModelShape, decode_rank: int,
                   want: KVShard, replica_choice: int) -> list[ShardMessage]:
    messages = []
    stages = split_layers(model.num_layers, prefill.pp, prefill.stage_layers)
    for stage, (start, end) in enumerate(stages):
        layers = (max(start, want.layers[0]), min(end, want.layers[1]))
        if layers[0] >= layers[1]:
            continue
        sources = [_source(prefill, model, stage, head, replica_choice)
                   for head in range(*want.heads)]
        run_start = want.heads[0]
        for i, source in enumerate(sources):  # merge consecutive heads of one source
            head = want.heads[0] + i
            if i + 1 == len(sources) or sources[i + 1] != source:
                messages.append(ShardMessage(source, decode_rank,
                                             KVShard(layers, (run_start, head + 1))))
                run_start = head + 1
    return messages


def _source(prefill: ParallelLayout, model: ModelShape, stage: int, head: int,
            replica_choice: int) -> int:
    """The prefill rank of `stage` that `head` is read from (one of its replicas)."""
    holders = [stage * prefill.tp + t for t in range(prefill.tp)
               if _holds(prefill, model, t, head)]
    return holders[replica_choice % len(holders)]


def _holds(layout: ParallelLayout, model: ModelShape, tp_rank: int, head: int) -> bool:
    first, count = kv_heads_of_rank(model.num_kv_heads,
                                    ParallelContext(tp_rank=tp_rank, tp_size=layout.tp))
    return first <= head < first + count


def sends_of(plan: tuple[ShardMessage, ...], prefill_rank: int) -> list[ShardMessage]:
    """The messages prefill rank `prefill_rank` sends, in plan order."""
    return [m for m in plan if m.prefill_rank == prefill_rank]


def receives_of(plan: tuple[ShardMessage, ...], decode_rank: int) -> list[ShardMessage]:
    """The messages decode rank `decode_rank` receives, in plan order."""
    return [m for m in plan if m.decode_rank == decode_rank]


def message_between(plan: tuple[ShardMessage, ...], prefill_rank: int,
                    decode_rank: int) -> ShardMessage | None:
    """The one message of this rank pair, or None when the pair exchanges nothing."""
    for message in plan:
        if (message.prefill_rank, message.decode_rank) == (prefill_rank, decode_rank):
            return message
    return None
