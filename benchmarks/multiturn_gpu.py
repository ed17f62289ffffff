"""Issue 17's multi-turn chat on one GPU: prefix caching on vs off on one colocated engine.

The workload (benchmarks/multiturn_workload.py; by default benchmarks/datasets/multiturn_chat.json:
64 conversations x 6 turns, a 1,000-token shared system prompt, each turn resending the whole
history, token ids only) is replayed by benchmarks/multiturn_replay.py, the replay of the CPU
cluster run (serving_multiturn.py): every conversation's turns in order, all conversations at
once, each prompt built from the answers the engine actually gave.

The engine is the real one, in this process: `LLMEngine` (scheduler, prefix cache, chunked
prefill; on CUDA asynchronous scheduling, decode CUDA graphs and its start-up warm-up) holding a
Llama-3-8B-shaped model with random bf16 weights, stepped on its own thread by `EngineLoop`
(engine/engine_loop.py, the loop the prefill and decode workers run). Requests reach it as loop
commands; each step's outputs reach the asyncio replay in one `call_soon_threadsafe`, as in the
colocated server's backend. No router, gRPC or Ray (the GPU machine has no Ray and a grpcio too
old for the generated code) and no tokenizer: ids in, ids out, nothing detokenized. With one
instance there is no routing policy to compare (that is the CPU 2P+2D run's job).

Variants, in one run: two engines over the same weights and the same number of KV blocks, prefix
caching on, then off. Each first replays a warm-up (a few conversations with run 0's token
shift; not recorded), then the whole workload with run 1's shift, which shares no block with the
warm-up; both variants send the same ids, so their answers can be compared. Greedy on the same
weights: the cache must not change an answer. In fp32 (the CPU dry run) the script requires
identical answers; in bf16 a hit changes how tokens are batched, bf16 GEMMs are not batch
invariant and random weights give near-ties, so there it reports the fraction that match.

    python benchmarks/multiturn_gpu.py          # one GPU -> results/multiturn_gpu_<gpu>.json
    python benchmarks/multiturn_gpu.py --tiny --device cpu --conversations 4 --turns 3
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == REPO_ROOT / "benchmarks":
    # run as a script: benchmarks/kernels.py would shadow the `kernels` package transformers uses
    sys.path[0] = str(REPO_ROOT)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import AsyncIterator, Callable  # noqa: E402

import torch  # noqa: E402

from benchmarks.gpu_common import device_info, print_table, write_results  # noqa: E402
from benchmarks.latency import CFG  # noqa: E402
from benchmarks.multiturn_replay import TurnResult, replay, summarize  # noqa: E402
from benchmarks.multiturn_workload import DEFAULT_OUT, Conversation, Workload  # noqa: E402
from benchmarks.multiturn_workload import main as write_workload  # noqa: E402
from engine.builder import LoadedModel, build_model, init_random_weights  # noqa: E402
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, resolve_dtype  # noqa: E402
from engine.engine_loop import EngineLoop  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.outputs import RequestOutput  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

BLOCK_SIZE = 16
ROUTING = ("not applicable: one colocated instance and no router; kv_aware / least_loaded / "
           "round_robin are compared on the CPU 2P+2D cluster (serving_multiturn.py)")
COLUMNS = ["variant", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "wall_s", "prompt_tokens",
           "prefill_tokens_computed", "hit_rate", "preemptions"]
RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "wall_s", "prefill_tokens_computed")


class IdsOnlyTokenizer:
    """What the engine needs of a tokenizer when clients send and read token ids only: no eos
    (every request ignores it) and no text (decode gives ''), so nothing is detokenized."""

    name = "ids-only"
    eos_token_ids: tuple[int, ...] = ()

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


class EngineStreams:
    """Token-id streams from one engine stepped on its own thread by an `EngineLoop`.

    The engine thread owns the engine: adds, aborts and stats run there as loop commands. The
    event loop owns the per-request queues (bounded by the request's max_tokens); each step's
    outputs cross in one `call_soon_threadsafe`. A crashed step fails every open stream."""

    def __init__(self, engine: LLMEngine, timeout_s: float) -> None:
        self._engine = engine
        self._timeout_s = timeout_s  # per request
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._aio: asyncio.AbstractEventLoop | None = None
        self._loop = EngineLoop(self._step, engine.has_unfinished, "multiturn-bench",
                                device=engine.kv_cache.device, on_error=self._on_error)

    async def __aenter__(self) -> EngineStreams:
        self._aio = asyncio.get_running_loop()
        self._loop.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.to_thread(self._loop.stop)

    async def call(self, fn: Callable[[], object]) -> object:
        """`fn()` on the engine thread."""
        return await asyncio.wrap_future(self._loop.call(fn))

    async def stream(self, prompt: list[int], max_tokens: int) -> AsyncIterator[list[int]]:
        """The replay's `StreamFn`: greedy, ignore_eos; each step's new ids."""
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue(maxsize=max_tokens + 2)
        self._queues[request_id] = queue
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        deadline_s = time.monotonic() + self._timeout_s
        finished = False
        try:
            await self.call(lambda: self._engine.add_request(prompt, params, request_id))
            while not finished:
                item = await asyncio.wait_for(queue.get(), deadline_s - time.monotonic())
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop died") from item
                finished = item.finished
                yield item.new_token_ids
        finally:
            del self._queues[request_id]
            if not finished:
                self._loop.submit(lambda: self._engine.abort(request_id))

    async def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no request is left and every KV block is back in the pool; raises past
        `timeout_s` (a request or a block leaked)."""
        kv = self._engine.kv_manager
        deadline_s = time.monotonic() + timeout_s
        while True:
            busy, held = await self.call(lambda: (self._engine.has_unfinished(),
                                                  kv.num_blocks - kv.num_free_blocks))
            if not busy and not held:
                return
            if time.monotonic() > deadline_s:
                raise RuntimeError(f"engine not idle {timeout_s:.0f} s after the replay: "
                                   f"unfinished={busy}, {held} KV blocks held")
            await asyncio.sleep(0.05)

    def _step(self) -> None:  # engine thread
        outputs = self._engine.step()
        if outputs:
            self._aio.call_soon_threadsafe(self._dispatch, outputs)

    def _on_error(self, error: BaseException) -> None:  # engine thread, once, after a crash
        self._aio.call_soon_threadsafe(
            lambda: [q.put_nowait(error) for q in self._queues.values() if not q.full()])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:  # event loop
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:  # None: its stream already ended
                queue.put_nowait(output)


def tiny_config(vocab_size: int) -> ModelConfig:
    """A two-layer Llama for the CPU dry run (the workload's vocabulary)."""
    return ModelConfig(architecture="llama", vocab_size=vocab_size, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position_embeddings=CFG.max_position_embeddings)


def load_workload(path: Path, conversations: int | None, turns: int | None) -> Workload:
    """The workload file (issue 17's shape written first when it is missing), cut down to the
    first `conversations`, each to its first `turns`."""
    if not path.exists():
        write_workload(["--out", str(path)])
    workload = Workload.load(path)
    for name, value in (("conversations", conversations), ("turns", turns)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    kept = [Conversation(c.turns[:turns]) for c in workload.conversations[:conversations]]
    return Workload(workload.system_token_ids, kept, workload.vocab_size, workload.seed)


def kv_blocks_for(workload: Workload) -> int:
    """Twice the blocks every conversation's whole history needs at once: no preemption, and
    the same pool (and cache room) on any GPU."""
    def blocks(conv: Conversation) -> int:
        tokens = len(workload.system_token_ids) + sum(len(t.user_token_ids) + t.max_tokens
                                                      for t in conv.turns)
        return -(-tokens // BLOCK_SIZE) + 1
    return 2 * sum(blocks(c) for c in workload.conversations)


def build_engine(loaded: LoadedModel, args, prefix_caching: bool,
                 num_blocks: int) -> LLMEngine:
    config = EngineConfig(
        model="default", device=args.device, dtype=args.dtype,
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks,
                          enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens))
    return LLMEngine(config, loaded=loaded)


async def measure(engine: LLMEngine, workload: Workload, warmup: Workload,
                  timeout_s: float) -> tuple[dict, list[TurnResult]]:
    """Warm-up replay (run 0's ids, not recorded), then the workload (run 1's ids)."""
    async with EngineStreams(engine, timeout_s) as streams:
        await asyncio.wait_for(replay(streams.stream, warmup, run=0), timeout_s)
        await streams.wait_idle()
        before = await streams.call(engine.stats)
        started = time.perf_counter()
        turns = await asyncio.wait_for(replay(streams.stream, workload, run=1), timeout_s)
        wall_s = time.perf_counter() - started
        await streams.wait_idle()
        after = await streams.call(engine.stats)
    output_tokens = sum(len(t.answer_token_ids) for t in turns)
    return {"wall_s": round(wall_s, 2), "output_tokens": output_tokens,
            "output_tokens_per_s": round(output_tokens / wall_s, 1),
            **summarize(turns, after.prefix_hit_tokens - before.prefix_hit_tokens),
            "prefix_queried_tokens": after.prefix_queried_tokens - before.prefix_queried_tokens,
            "preemptions": after.num_preemptions - before.num_preemptions}, turns


def run_variant(loaded: LoadedModel, args, workload: Workload, warmup: Workload,
                prefix_caching: bool, num_blocks: int) -> tuple[dict, list[TurnResult]]:
    started = time.perf_counter()
    engine = build_engine(loaded, args, prefix_caching, num_blocks)
    build_s = time.perf_counter() - started
    try:
        row, turns = asyncio.run(measure(engine, workload, warmup, args.timeout_s))
    finally:
        engine.shutdown()
    row = {"variant": f"cache_{'on' if prefix_caching else 'off'}",
           "prefix_caching": prefix_caching, "engine_build_s": round(build_s, 1),
           "engine_warmup_s": round(engine.warmup_s, 1), **row}
    del engine
    gc.collect()  # this engine's KV cache before the next one's
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(row, flush=True)
    return row, turns


def compare_answers(on: list[TurnResult], off: list[TurnResult]) -> dict:
    """How many turns got the same answer with the cache on and off (same prompts until the
    first difference in a conversation)."""
    same = [a.answer_token_ids == b.answer_token_ids for a, b in zip(on, off, strict=True)]
    first = next(((r.conversation, r.turn) for r, s in zip(on, same) if not s), None)
    return {"turns": len(same), "identical": sum(same),
            "identical_fraction": round(sum(same) / len(same), 4),
            "first_difference": None if first is None else {"conversation": first[0],
                                                            "turn": first[1]}}


def ratios(on: dict, off: dict) -> dict:
    """cache on / cache off of the latencies, the wall time and the prefill work."""
    return {k: round(on[k] / off[k], 3) for k in RATIO_KEYS
            if on.get(k) is not None and off.get(k)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", type=Path, default=DEFAULT_OUT,
                   help="written with issue 17's shape if missing")
    p.add_argument("--conversations", type=int, default=None, help="keep the first N")
    p.add_argument("--turns", type=int, default=None, help="keep each one's first N turns")
    p.add_argument("--warmup-conversations", type=int, default=8)
    p.add_argument("--order", default="on,off,on",
                   help="variants in run order (one process, same weights); the last of each "
                        "is compared, an earlier one shows what running first costs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tiny", action="store_true", help="a two-layer Llama (CPU dry run)")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="default: twice what every conversation's history needs at once")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--timeout-s", type=float, default=200.0, help="per replay")
    p.add_argument("--result-file", type=Path, default=None,
                   help="default: results/multiturn_gpu_<gpu>.json on cuda, none on cpu")
    args = p.parse_args(argv)
    names = args.order.split(",")
    if not set(names) <= {"on", "off"} or not {"on", "off"} <= set(names):
        p.error(f"--order: 'on' and 'off' (each at least once, comma-separated), got {args.order!r}")
    args.dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    workload = load_workload(args.workload, args.conversations, args.turns)
    warmup = load_workload(args.workload, args.warmup_conversations, 2)
    cfg = tiny_config(workload.vocab_size) if args.tiny else CFG
    if workload.vocab_size > cfg.vocab_size:
        raise ValueError(f"workload vocab_size {workload.vocab_size} exceeds the model's "
                         f"{cfg.vocab_size}")
    model = build_model(cfg, resolve_dtype(args.dtype, args.device), args.device)
    init_random_weights(model, seed=0)
    loaded = LoadedModel(cfg, model, IdsOnlyTokenizer())
    num_blocks = args.num_kv_blocks or kv_blocks_for(workload)
    runs = {}  # the last run of each variant is the one compared
    rows = []
    for name in args.order.split(","):
        row, turns = run_variant(loaded, args, workload, warmup, name == "on", num_blocks)
        row["run"] = len(rows)
        rows.append(row)
        runs[name] = (row, turns)
    (on, on_turns), (off, off_turns) = runs["on"], runs["off"]
    answers = compare_answers(on_turns, off_turns)
    payload = {
        "device": device_info() if args.device == "cuda" else {"gpu": "cpu",
                                                               "torch": torch.__version__},
        "model": ("tiny 2-layer Llama" if args.tiny else "Llama-3-8B shape") +
                 f", random {args.dtype} weights",
        "engine": f"one colocated LLMEngine, {num_blocks} KV blocks of {BLOCK_SIZE}, "
                  f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
                  f"{args.max_num_batched_tokens}",
        "routing": ROUTING, "workload_file": str(args.workload),
        "workload": {"conversations": len(workload.conversations),
                     "turns": len(workload.conversations[0].turns),
                     "system_tokens": len(workload.system_token_ids),
                     "requests": workload.num_requests},
        "order": args.order, "variants": rows, "on_over_off": ratios(on, off),
        "answers_on_vs_off": answers,
        "script_wall_s": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = args.result_file
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    elif args.device == "cuda":
        path = write_results("multiturn_gpu", payload)
    print(f"routing: {ROUTING}")
    print(f"answers identical with the cache on and off: {answers['identical']} of "
          f"{answers['turns']} turns; whole script {payload['script_wall_s']} s")
    if path is not None:
        print(f"wrote {path}")
    print_table(rows + [{"variant": "on / off (last runs)", **payload["on_over_off"]}], COLUMNS)
    for row in rows:
        print(f"run {row['run']} {row['variant']}: TTFT p50 by turn {row['ttft_p50_ms_by_turn']}")
    if args.dtype == "float32" and answers["identical"] != answers["turns"]:
        print(f"FAILED: fp32 greedy answers differ with the cache on and off, first at "
              f"{answers['first_difference']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
