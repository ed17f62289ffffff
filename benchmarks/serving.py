"""Serving benchmark: a load generator for a pdserve router that reports what `vllm bench serve`
reports, so numbers read the same way.

    # against a router already listening on this machine
    .venv/bin/python benchmarks/serving.py --address 127.0.0.1:50051 --num-prompts 200 \\
        --request-rate 4 --dataset sharegpt-like --goodput ttft:500 tpot:50 --result-file r.json
    # standalone: an in-process router over one colocated engine with the default model
    .venv/bin/python benchmarks/serving.py --start-colocated --num-prompts 8 \\
        --random-input-len 64 --random-output-len 16 [--backend openai: the OpenAI HTTP API]
    # a chat file (benchmarks/multiturn_workload.py): routing policies x caching on/off, 2P+2D
    .venv/bin/python benchmarks/serving.py --multiturn FILE --result-file r.json

Requests arrive as a Poisson process at `--request-rate` per second (`inf`: all at once), at
most `--max-concurrency` in flight. Prompts are random token ids with lengths from `--dataset`:
`random` (uniform around `--random-input-len` / `--random-output-len`) or `sharegpt-like`
(pairs from benchmarks/datasets/sharegpt_like_lengths.json). Per request, on the client:

- TTFT: send until the first message carrying a token.
- TPOT: (E2E - TTFT) / (output tokens - 1): the first token excluded; none for 1-token outputs.
- ITL: the gaps between consecutive token-carrying messages (one message may carry several
  tokens when the server streams them together, as in vLLM's chunk-level ITL).
- E2E latency: send until the last message.

Goodput follows DistServe: a request counts when it meets every `--goodput` SLO; reported as
requests/s over the duration and as the attained fraction of all requests (a request rate
"has goodput" when that fraction is >= 0.9). Duration runs from the first send to the last
completion. Every wait is bounded: each request by `--request-timeout-s`, the run by
`--max-duration-s` (requests still open then count as failed).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (only --start-colocated imports it): see tests/conftest.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.serving_colocated import colocated_router  # noqa: E402
from benchmarks.serving_multiturn import run as run_multiturn  # noqa: E402
from benchmarks.serving_openai import OpenAIClient  # noqa: E402
from router.client import PdserveClient  # noqa: E402

SHAREGPT_LIKE_PATH = REPO_ROOT / "benchmarks" / "datasets" / "sharegpt_like_lengths.json"
LOOPBACK_HOST = "127.0.0.1"
FIRST_TOKEN_ID = 100  # synthetic prompts skip the low ids, where tokenizers keep special tokens
SLO_NAMES = ("ttft", "tpot", "e2el")
SERVER_TIMING_FIELDS = ("queue_s", "prefill_s", "kv_transfer_s", "decode_s")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one request; times in seconds from its send."""

    num_input_tokens: int
    ok: bool = False
    error: str = ""
    num_output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    server_timing_s: dict[str, float] = field(default_factory=dict)

    @property
    def tpot_s(self) -> float | None:
        n = self.num_output_tokens
        return None if n < 2 else (self.e2e_s - self.ttft_s) / (n - 1)

    def latency_ms(self, name: str) -> float | None:
        seconds = {"ttft": self.ttft_s, "tpot": self.tpot_s, "e2el": self.e2e_s}[name]
        return None if seconds is None else seconds * 1e3


# ---- workload ------------------------------------------------------------------------------------
def random_lengths(num: int, input_len: int, output_len: int, range_ratio: float,
                   rng: random.Random) -> list[tuple[int, int]]:
    """Lengths uniform in [len * (1 - ratio), len * (1 + ratio)], as vLLM's random dataset."""
    def draw(length: int) -> int:
        return rng.randint(max(1, math.floor(length * (1 - range_ratio))),
                           max(1, math.ceil(length * (1 + range_ratio))))
    return [(draw(input_len), draw(output_len)) for _ in range(num)]


def sharegpt_like_lengths(num: int, path: Path, context_length: int, rng: random.Random,
                          output_len: int | None) -> list[tuple[int, int]]:
    """`num` pairs from the lengths file, shuffled (cycled when `num` exceeds it), keeping those
    that fit the model's context; `output_len` overrides every output length."""
    pairs = [(num_in, output_len or num_out)
             for num_in, num_out in json.loads(path.read_text())["pairs"]]
    pairs = [(num_in, num_out) for num_in, num_out in pairs if num_in + num_out <= context_length]
    if not pairs:
        raise ValueError(f"no length pair in {path} fits the context length {context_length}")
    rng.shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(num)]


def build_specs(args: argparse.Namespace, vocab_size: int,
                context_length: int) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        lengths = random_lengths(args.num_prompts, args.random_input_len, args.random_output_len,
                                 args.random_range_ratio, rng)
    else:
        lengths = sharegpt_like_lengths(args.num_prompts, args.sharegpt_lengths, context_length,
                                        rng, args.sharegpt_output_len)
    low = FIRST_TOKEN_ID if vocab_size > FIRST_TOKEN_ID else 0
    return [RequestSpec([rng.randrange(low, vocab_size) for _ in range(num_in)], num_out)
            for num_in, num_out in lengths]


# ---- load --------------------------------------------------------------------------------------
async def send(client: PdserveClient | OpenAIClient, spec: RequestSpec,
               args: argparse.Namespace) -> RequestResult:
    """One streamed request, timed on the client."""
    result = RequestResult(len(spec.prompt_token_ids))
    if isinstance(client, OpenAIClient):
        return await client.stream(spec, args.temperature, args.ignore_eos, result)
    start_s = last_s = time.perf_counter()
    call = client.generate_stream(prompt_token_ids=spec.prompt_token_ids,
                                  max_tokens=spec.max_tokens, temperature=args.temperature,
                                  ignore_eos=args.ignore_eos, timeout_s=args.request_timeout_s)
    try:
        async for response in call:
            now_s = time.perf_counter()
            if response.token_ids:
                if result.num_output_tokens == 0:
                    result.ttft_s = now_s - start_s
                else:
                    result.itls_s.append(now_s - last_s)
                last_s = now_s
                result.num_output_tokens += len(response.token_ids)
            if response.finish_reason:
                result.server_timing_s = {name: getattr(response.timing, name)
                                          for name in SERVER_TIMING_FIELDS}
            result.e2e_s = now_s - start_s
        result.ok = result.num_output_tokens > 0
        result.error = "" if result.ok else "no token received"
    except grpc.aio.AioRpcError as error:
        result.error = f"{error.code().name}: {error.details()}"
    except asyncio.CancelledError:
        call.cancel()  # frees the request's KV blocks on the server
        raise
    return result


async def run_load(client: PdserveClient, specs: list[RequestSpec],
                   args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    """Send `specs` with Poisson arrivals; returns the results in spec order and the duration."""
    arrivals = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def limited(spec: RequestSpec) -> RequestResult:
        if limit is None:
            return await send(client, spec, args)
        async with limit:
            return await send(client, spec, args)

    start_s = time.perf_counter()
    deadline_s = start_s + args.max_duration_s
    tasks: list[asyncio.Task[RequestResult]] = []
    for spec in specs:
        if time.perf_counter() >= deadline_s:
            break
        tasks.append(asyncio.create_task(limited(spec)))
        if math.isfinite(args.request_rate):
            gap_s = arrivals.expovariate(args.request_rate)
            await asyncio.sleep(min(gap_s, max(0.0, deadline_s - time.perf_counter())))
    pending = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline_s - time.perf_counter()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    duration_s = time.perf_counter() - start_s
    results = [RequestResult(len(s.prompt_token_ids), error="open at --max-duration-s")
               if t in pending else t.result() for s, t in zip(specs, tasks)]
    results += [RequestResult(len(s.prompt_token_ids), error="not sent before --max-duration-s")
                for s in specs[len(tasks):]]
    return results, duration_s


# ---- report ------------------------------------------------------------------------------------
def distribution_ms(name: str, values_ms: list[float]) -> dict[str, float]:
    """mean / median / p90 / p99 (numpy's linear interpolation, like vLLM); 0 when empty."""
    values = np.asarray(values_ms, dtype=np.float64) if values_ms else np.zeros(1)
    stats = {"mean": values.mean(), "median": np.median(values),
             "p90": np.percentile(values, 90), "p99": np.percentile(values, 99)}
    return {f"{stat}_{name}_ms": round(float(v), 3) for stat, v in stats.items()}


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    if not result.ok:
        return False
    # A 1-token output has no TPOT: nothing of it can be late by that measure.
    return all((value := result.latency_ms(name)) is None or value <= limit_ms
               for name, limit_ms in slos_ms.items())


def summarize(results: list[RequestResult], duration_s: float, slos_ms: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    num_in = sum(r.num_input_tokens for r in ok)
    num_out = sum(r.num_output_tokens for r in ok)
    summary = {
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common(5)),
        "duration_s": round(duration_s, 3),
        "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": round(len(ok) / duration_s, 3),
        "input_throughput": round(num_in / duration_s, 3),
        "output_throughput": round(num_out / duration_s, 3),
        "total_token_throughput": round((num_in + num_out) / duration_s, 3),
    }
    if slos_ms:
        good = sum(meets_slos(r, slos_ms) for r in results)
        summary["request_goodput"] = round(good / duration_s, 3)
        summary["slo_attainment"] = round(good / len(results), 4) if results else 0.0
    summary |= distribution_ms("ttft", [r.ttft_s * 1e3 for r in ok])
    summary |= distribution_ms("tpot", [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None])
    summary |= distribution_ms("itl", [gap * 1e3 for r in ok for gap in r.itls_s])
    summary |= distribution_ms("e2el", [r.e2e_s * 1e3 for r in ok])
    timed = [r.server_timing_s for r in ok if r.server_timing_s]
    summary["server_timing_mean_ms"] = {  # the router's own Timing of each request
        name.removesuffix("_s"): round(1e3 * sum(t[name] for t in timed) / len(timed), 3)
        if timed else 0.0 for name in SERVER_TIMING_FIELDS}
    return summary


def print_summary(summary: dict) -> None:
    print("{:=^60}".format(" Serving Benchmark Result "))
    print(f"{summary['model']} | {summary['dataset']} | {summary['num_prompts']} prompts | "
          f"rate {summary['request_rate']} | max concurrency {summary['max_concurrency']}")
    for key in list(summary)[list(summary).index("successful_requests"):]:
        if isinstance(summary[key], (int, float)):
            print(f"{key:<44}{summary[key]:>16}")
    if summary["errors"]:
        print(f"errors: {summary['errors']}")
    print("=" * 60)


# ---- running it --------------------------------------------------------------------------------
async def benchmark(args: argparse.Namespace, loaded=None) -> dict:
    """Run the whole benchmark and return the summary (what --result-file holds)."""
    async with contextlib.AsyncExitStack() as stack:
        address, base_url = args.address, args.base_url
        if args.start_colocated:  # one router, both transports
            queue_limit = max(256, args.num_prompts)  # let --request-rate inf queue everything
            router = await stack.enter_async_context(colocated_router(
                LOOPBACK_HOST, args.model, args.device, queue_limit, loaded, args.max_num_seqs,
                args.async_scheduling, http=args.backend == "openai"))
            address, base_url = router.address, router.http and router.http.url
        client = await stack.enter_async_context(PdserveClient(address))
        try:
            info = await asyncio.wait_for(client.model_info(), args.request_timeout_s)
        except grpc.aio.AioRpcError as error:
            raise RuntimeError(f"no pdserve router answers at {address} ({error.code().name}); "
                               "start one or pass --start-colocated") from None
        if args.backend == "openai":
            address = base_url
            client = await stack.enter_async_context(OpenAIClient(address, args.request_timeout_s))
        specs = build_specs(args, info.vocab_size, info.context_length)
        warmup = await send(client, RequestSpec(specs[0].prompt_token_ids, 2), args)
        if not warmup.ok:
            raise RuntimeError(f"the warm-up request to {address} failed: {warmup.error}")
        results, duration_s = await run_load(client, specs, args)
    header = {"backend": f"pdserve-{args.backend}",
              "address": "colocated" if args.start_colocated else address,
              "model": info.model_name, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "request_rate": str(args.request_rate), "max_concurrency": args.max_concurrency,
              "seed": args.seed, "ignore_eos": args.ignore_eos, "goodput_slos_ms": args.goodput,
              "max_num_seqs": args.max_num_seqs if args.start_colocated else None,
              "async_scheduling": args.async_scheduling if args.start_colocated else None,
              "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return header | summarize(results, duration_s, args.goodput)


def loopback_address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if host != LOOPBACK_HOST or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected {LOOPBACK_HOST}:PORT (this benchmark only "
                                         f"drives a router on this machine), got {text!r}")
    return text


def slo(text: str) -> tuple[str, float]:
    name, _, value = text.partition(":")
    try:
        limit_ms = float(value)
    except ValueError:
        limit_ms = -1.0
    if name not in SLO_NAMES or not limit_ms > 0:
        raise argparse.ArgumentTypeError(f"expected NAME:MS with NAME in {', '.join(SLO_NAMES)} "
                                         f"and MS > 0, got {text!r}")
    return name, limit_ms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--address", type=loopback_address, default=f"{LOOPBACK_HOST}:50051")
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="openai: POST /v1/completions, SSE (vocabulary still from --address)")
    p.add_argument("--base-url", default=f"http://{LOOPBACK_HOST}:8080",
                   help="with --backend openai: the router's HTTP API (pdserve serve --http-port)")
    p.add_argument("--start-colocated", action="store_true",
                   help="start an in-process router over one engine and ignore --address")
    p.add_argument("--model", default="default", help="with --start-colocated")
    p.add_argument("--device", default="auto", help="with --start-colocated: cpu, cuda or auto")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="with --start-colocated: the engine's running batch limit")
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="with --start-colocated: the engine's asynchronous scheduling")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second; inf sends every request at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--dataset", choices=("random", "sharegpt-like"), default="random")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--sharegpt-lengths", type=Path, default=SHAREGPT_LIKE_PATH)
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="override every output length of the sharegpt-like dataset")
    p.add_argument("--goodput", type=slo, nargs="+", default=[], metavar="NAME:MS",
                   help="SLOs in ms, e.g. ttft:500 tpot:50 (also e2el)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the dataset's output lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout-s", type=float, default=600.0, help="gRPC deadline each")
    p.add_argument("--max-duration-s", type=float, default=3600.0, help="bound on the whole run")
    p.add_argument("--result-file", type=Path, default=None, help="write the summary as JSON")
    p.add_argument("--multiturn", type=Path, default=None, help="replay this chat workload")
    args = p.parse_args(argv)
    _check(p, args)
    args.goodput = dict(args.goodput)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {"--num-prompts": args.num_prompts, "--random-input-len": args.random_input_len,
                "--max-num-seqs": args.max_num_seqs, "--random-output-len": args.random_output_len,
                "--request-rate": args.request_rate, "--request-timeout-s": args.request_timeout_s,
                "--max-duration-s": args.max_duration_s}
    positive |= {flag: value for flag, value in (("--max-concurrency", args.max_concurrency), (
        "--sharegpt-output-len", args.sharegpt_output_len)) if value is not None}
    for flag, value in positive.items():
        if not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    if not 0.0 <= args.random_range_ratio < 1.0:
        parser.error(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")


def main(argv: list[str] | None = None, loaded=None) -> int:
    """The command line; `loaded` is `benchmark`'s (a test's already loaded model)."""
    args = parse_args(argv)
    if args.multiturn is not None:  # its own CPU cluster and report (serving_multiturn.py)
        return 0 if run_multiturn(args.multiturn, args.result_file, args.request_timeout_s) else 1
    try:
        summary = asyncio.run(benchmark(args, loaded))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.result_file is not None:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        args.result_file.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.result_file}")
    return 0 if summary["successful_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
