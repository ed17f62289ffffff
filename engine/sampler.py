"""Batched token sampling on the logits' device, without host syncs or per-request loops.

Randomness is counter-based: the noise for vocab entry v of the token at output index `step`
of a request is a pure function of (seed, step, v), computed by an integer hash. A request
therefore draws the same tokens whether it runs alone or in any batch, and whichever worker
samples a given step (the prefill worker samples step 0, a decode worker the rest).

Per step the engine builds `SamplingTensors.from_params(...)` (CPU bookkeeping, one small
host-to-device copy per kind) and calls `Sampler()(logits, tensors)`. Order of operations:
repetition penalty -> greedy argmax | temperature -> top-k -> top-p -> min-p -> sample.
The draw itself is the exponential race argmax(logits - log E), E = -log(noise): one fused
Triton pass on CUDA (`engine/kernels/sampling.py`), `sample_race_ref` elsewhere. A tensor-
parallel stage draws the same ids from its vocab slice (`engine/tp_sampler.py`), which is why
the noise, the race keys, min-p and the seen mask also take a slice's first token id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kernels import dispatch
from engine.plan import SamplingRow
from engine.sampling_params import MAX_SEED, SamplingParams

_MASK32 = 0xFFFFFFFF
_SEED_SALT = 0x9E3779B9  # separates the seed lane from the vocab lane of the hash
_VOCAB_SALT = 0x7F4A7C15


# ---------------------------------------------------------------- counter-based RNG


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), never overflowing int64 (device-exact)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: Tensor) -> Tensor:
    """Murmur3 finalizer: a bijection of [0, 2**32) with full avalanche, in int64 lanes."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_noise(seeds: Tensor, steps: Tensor, vocab_size: int, first_id: int = 0) -> Tensor:
    """Uniforms in the open interval (0, 1), shape [B, vocab_size], a pure function of
    (seeds[b], steps[b], vocab index); bit-identical on every device and batch layout. Column j
    is token `first_id + j`: a tensor rank's vocab slice draws the single-rank noise."""
    row_key = _fmix32((seeds & _MASK32) ^ _SEED_SALT)
    row_key = _fmix32(row_key ^ ((seeds >> 32) & _MASK32))
    row_key = _fmix32(row_key ^ (steps & _MASK32))
    vocab = torch.arange(first_id, first_id + vocab_size, dtype=torch.int64, device=seeds.device)
    vocab_key = _fmix32(vocab ^ _VOCAB_SALT)
    bits = _fmix32(row_key[:, None] ^ vocab_key[None, :])
    # 23 bits so that (k + 0.5) is exact in float32: u is never 0 and never 1
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)


# ---------------------------------------------------------------- masks (pure functions)


def apply_repetition_penalty(logits: Tensor, seen_mask: Tensor, penalties: Tensor) -> Tensor:
    """HF semantics: a seen token's logit is divided by the penalty when positive, else
    multiplied by it; unseen tokens are unchanged. `seen_mask` is [B, V] bool."""
    penalty = penalties[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen_mask, penalized, logits)


def apply_top_k_top_p(
    logits: Tensor, top_ks: Tensor | None, top_ps: Tensor | None
) -> Tensor:
    """Mask (to -inf) everything outside each row's top-k, then outside the nucleus of the
    renormalized remainder, sharing one sort.

    Top-k keeps exactly k tokens: ties at the boundary are broken by the stable sort, so the
    lower token id wins. Top-p keeps the minimal prefix of the sorted distribution whose mass
    reaches top_p, and always at least the most likely token; rows with top_p == 1 are
    untouched (no rounding can drop their tail).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    if top_ks is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_ks[:, None], -torch.inf)
    if top_ps is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
        sorted_logits = sorted_logits.masked_fill(outside, -torch.inf)
    return logits.scatter(-1, order, sorted_logits)


def apply_top_k(logits: Tensor, top_ks: Tensor) -> Tensor:
    """Keep exactly top_ks[b] tokens of row b (see `apply_top_k_top_p` for ties)."""
    return apply_top_k_top_p(logits, top_ks, None)


def apply_top_p(logits: Tensor, top_ps: Tensor) -> Tensor:
    """Keep the minimal nucleus of mass >= top_ps[b] of row b."""
    return apply_top_k_top_p(logits, None, top_ps)


def apply_min_p(logits: Tensor, min_ps: Tensor, row_max: Tensor | None = None) -> Tensor:
    """Drop tokens whose prob < min_p * max prob. Written on logits (prob ratios are logit
    differences), so it needs no softmax and holds after any earlier renormalization.
    `row_max` ([B, 1]) replaces the rows' own max: a vocab slice passes the whole row's."""
    if row_max is None:
        row_max = logits.amax(dim=-1, keepdim=True)
    threshold = row_max + min_ps[:, None].log()
    return logits.masked_fill(logits < threshold, -torch.inf)


# ---------------------------------------------------------------- per-step tensors


@dataclass(slots=True)
class SamplingTensors:
    """One step's sampling options as [B] tensors on the logits' device, plus flags (plain
    bools, decided on the CPU) that let the sampler skip work no request asked for."""

    temperatures: Tensor  # [B] float32; greedy rows hold 1.0 so dividing is harmless
    greedy_rows: Tensor  # [B] bool
    top_ks: Tensor  # [B] int64; vocab_size where off
    top_ps: Tensor  # [B] float32
    min_ps: Tensor  # [B] float32
    repetition_penalties: Tensor  # [B] float32
    seeds: Tensor  # [B] int64
    steps: Tensor  # [B] int64, index of the output token being sampled
    seen_mask: Tensor | None  # [B, V] (or [B, window]) bool, ids seen so far; only any_penalty
    vocab_size: int
    all_greedy: bool
    any_greedy: bool
    any_penalty: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    need_logprobs: bool

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        token_histories: list[list[int]] | None,
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingTensors:
        """Build the batch tensors; `seeds` are the engine-assigned per-request seeds."""
        _check_batch(params, seeds, steps, token_histories, vocab_size)
        histories = token_histories or [None] * len(params)
        rows = [SamplingRow(p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                            p.logprobs, seed, step,
                            tuple(h) if h is not None else None)
                for p, seed, step, h in zip(params, seeds, steps, histories)]
        return cls.from_rows(rows, vocab_size, device)

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str,
                  vocab_window: tuple[int, int] | None = None) -> SamplingTensors:
        """Build the batch tensors from a step plan's sampling rows (engine/plan.py).
        `vocab_window` = (first id, width): the seen mask covers only those columns (a tensor
        rank's vocab slice); every other field is the same as for the whole vocabulary."""
        top_ks = [vocab_size if r.top_k <= 0 else min(r.top_k, vocab_size) for r in rows]
        # each field is a row of one packed tensor, padded to a multiple of 4 entries so that
        # every row starts 16-byte aligned whatever the batch: Triton specializes a pointer
        # argument on that alignment, and a batch-dependent one would compile kernel
        # variants on the request path (engine/compile_watch.py)
        pad, batch = -len(rows) % 4, len(rows)
        floats = _to_device(torch.tensor(
            [[0.0 if r.is_greedy else r.temperature, r.top_p, r.min_p, r.repetition_penalty]
             for r in rows] + [[1.0, 1.0, 0.0, 1.0]] * pad,
            dtype=torch.float32,
        ).T.contiguous(), device)[:, :batch]
        ints = _to_device(torch.tensor([top_ks + [1] * pad, [r.seed for r in rows] + [0] * pad,
                                        [r.step for r in rows] + [0] * pad],
                                       dtype=torch.int64), device)[:, :batch]
        sampled = [r for r in rows if not r.is_greedy]
        any_penalty = any(r.repetition_penalty != 1.0 for r in rows)
        greedy_rows = floats[0] == 0.0
        histories = [list(r.token_history or ()) for r in rows] if any_penalty else None
        return cls(
            temperatures=floats[0].masked_fill(greedy_rows, 1.0),
            greedy_rows=greedy_rows,
            top_ks=ints[0], top_ps=floats[1], min_ps=floats[2],
            repetition_penalties=floats[3], seeds=ints[1], steps=ints[2],
            seen_mask=(_seen_mask(histories, vocab_size, device, vocab_window)
                       if any_penalty else None),
            vocab_size=vocab_size,
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(rows),
            any_penalty=any_penalty,
            any_top_k=any(0 < r.top_k < vocab_size for r in sampled),
            any_top_p=any(r.top_p < 1.0 for r in sampled),
            any_min_p=any(r.min_p > 0.0 for r in sampled),
            need_logprobs=any(r.logprobs for r in rows),
        )


def _to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """Host tensor -> device without blocking the host: a plain `.to("cuda")` waits for the
    stream, i.e. for the forward pass just launched, and every sampling kernel would then be
    launched only after the GPU went idle. Pinned + non_blocking lets the host queue them while
    the forward runs (the caching host allocator keeps the buffer until the copy is done)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _check_batch(
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
    token_histories: list[list[int]] | None,
    vocab_size: int,
) -> None:
    if not params:
        raise ValueError("params must hold at least one request")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    lengths = {"params": len(params), "seeds": len(seeds), "steps": len(steps)}
    if token_histories is not None:
        lengths["token_histories"] = len(token_histories)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"batch lists must have equal lengths, got {lengths}")
    if any(not 0 <= seed < MAX_SEED for seed in seeds):
        raise ValueError(f"seeds must be in [0, 2**63), got {seeds}")
    if any(step < 0 for step in steps):
        raise ValueError(f"steps must be >= 0, got {steps}")
    if token_histories is None and any(p.repetition_penalty != 1.0 for p in params):
        raise ValueError("token_histories are required when a repetition_penalty != 1")


def _seen_mask(histories: list[list[int]], vocab_size: int, device: torch.device | str,
               window: tuple[int, int] | None = None) -> Tensor:
    """[B, V] bool of tokens each row has seen, by one scatter from a padded id matrix whose
    padding points at an extra column that is then cut off. With `window` = (first, width):
    [B, width], column j = token first + j (ids outside the window are dropped)."""
    for history in histories:
        if history and not (0 <= min(history) and max(history) < vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size}), got {history}")
    columns = vocab_size
    if window is not None:
        first, columns = window
        histories = [[t - first for t in history if first <= t < first + columns]
                     for history in histories]
    width = max(1, max(len(history) for history in histories))
    padded = [history + [columns] * (width - len(history)) for history in histories]
    index = _to_device(torch.tensor(padded, dtype=torch.int64), device)
    mask = torch.zeros(len(histories), columns + 1, dtype=torch.bool, device=device)
    return mask.scatter_(1, index, True)[:, :columns]


# ---------------------------------------------------------------- the sampler


@dataclass(slots=True)
class SamplerOutput:
    """The chosen token of every row, and its logprob under the raw model logits."""

    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] float32, when any request asked for logprobs


class Sampler:
    """Picks one token per row of a [B, V] logits batch; stateless and device-agnostic."""

    def __call__(self, logits: Tensor, tensors: SamplingTensors) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != tensors.vocab_size:
            raise ValueError(
                f"logits must be [B, {tensors.vocab_size}], got {list(logits.shape)}"
            )
        raw = logits.float()
        logits = raw
        if tensors.any_penalty:
            logits = apply_repetition_penalty(
                logits, tensors.seen_mask, tensors.repetition_penalties
            )
        if tensors.all_greedy:
            token_ids = logits.argmax(dim=-1)
        elif tensors.any_greedy:
            token_ids = torch.where(tensors.greedy_rows, logits.argmax(dim=-1),
                                    _sample(logits, tensors))
        else:  # every row samples: no argmax pass over the batch's logits
            token_ids = _sample(logits, tensors)
        logprobs = None
        if tensors.need_logprobs:
            logprobs = raw.log_softmax(dim=-1).gather(1, token_ids[:, None]).squeeze(1)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def _sample(logits: Tensor, tensors: SamplingTensors) -> Tensor:
    """Random draw for every row by the exponential race: argmax(p / E) with E ~ Exp(1)
    picks token v with probability p[v] (the same law as Gumbel-max). Without top-k and
    min-p, on CUDA the kernels divide by the temperature as they read the row (no tempered
    copy), and top-p runs the sort-free cut only for rows whose race winner over the whole row
    is not surely in the nucleus (no masked copy; engine/kernels/top_p_race.py)."""
    temps = tensors.temperatures
    if not tensors.any_top_k and not tensors.any_min_p:
        if not tensors.any_top_p:
            return dispatch.sample_race(logits, tensors.seeds, tensors.steps, None, temps)
        ids = dispatch.sample_top_p(logits, tensors.seeds, tensors.steps, tensors.top_ps, temps)
        if ids is not None:
            return ids
    return dispatch.sample_race(_masked(logits / temps[:, None], tensors), tensors.seeds,
                                tensors.steps)


def sampling_logits(logits: Tensor, tensors: SamplingTensors) -> Tensor:
    """The logits whose softmax is the distribution a sampled row draws from: (penalized)
    logits / temperature, then top-k, top-p and min-p masks (-inf outside)."""
    return _masked(logits / tensors.temperatures[:, None], tensors)


def _masked(logits: Tensor, tensors: SamplingTensors) -> Tensor:
    """Tempered logits with the top-k, top-p and min-p masks applied (-inf outside)."""
    if tensors.any_top_p and not tensors.any_top_k:
        logits = dispatch.apply_top_p(logits, tensors.top_ps)  # sort-free on CUDA
    elif tensors.any_top_k or tensors.any_top_p:
        logits = apply_top_k_top_p(
            logits,
            tensors.top_ks if tensors.any_top_k else None,
            tensors.top_ps if tensors.any_top_p else None,
        )
    if tensors.any_min_p:
        logits = apply_min_p(logits, tensors.min_ps)
    return logits


def sample_race_ref(logits: Tensor, seeds: Tensor, steps: Tensor) -> Tensor:
    """argmax_v(logits[v] - log E_v) with E_v = -log u_v ~ Exp(1): picks v with probability
    softmax(logits)[v] (argmax p / E in log space: no softmax needed). Ties: lowest id."""
    return race_keys(logits, seeds, steps).argmax(dim=-1)


def race_keys(logits: Tensor, seeds: Tensor, steps: Tensor, first_id: int = 0) -> Tensor:
    """The race's keys logits[v] - log E_v, column j being token `first_id + j`: on a vocab
    slice they equal, bit for bit, the same columns of the whole row's keys."""
    exponentials = -uniform_noise(seeds, steps, logits.shape[-1], first_id).log()
    return logits - exponentials.log()
