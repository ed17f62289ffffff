"""How many tokens per second one router process can stream, with the model taken out.

The router runs in a child process over `SyntheticBackend`, a benchmark-only backend that emits
tokens as fast as it is asked for them (no model, no engine thread), behind the real grpc.aio
server, validation and response building. This process is the client: N concurrent streams
through the real `PdserveClient`, each issuing requests back to back for the duration. The
number is a ceiling for the router's per-token path (gRPC + protobuf + asyncio), not a model
throughput.

    .venv/bin/python benchmarks/router_throughput.py --streams 1 16 64 --duration-s 3
    .venv/bin/python benchmarks/router_throughput.py --transport http   # the OpenAI HTTP API

`--transport http` streams `POST /v1/completions` (SSE, aiohttp) from the same router process
instead of gRPC `Generate`; `ttft` is send to the first token-carrying message either way.
Prints a JSON summary and writes it to benchmarks/results/router_throughput_cpu.json
(`router_throughput_http_cpu.json` with `--transport http`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from protos.pdserve.v1 import generation_pb2  # noqa: E402
from router.backend import GenerationInput, Timing, TokenEvent  # noqa: E402
from router.client import PdserveClient  # noqa: E402
from router.server import start_router  # noqa: E402

RESULT_PATH = REPO_ROOT / "benchmarks" / "results" / "router_throughput_cpu.json"
VOCAB_SIZE = 1000
CONTEXT_LENGTH = 1 << 20


class _CharTokenizer:
    """Just enough tokenizer for validation: one token per character."""

    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB_SIZE for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class SyntheticBackend:
    """BENCHMARK ONLY: a GenerationBackend without a model; every event is `tokens_per_event`
    tokens, produced as fast as the router consumes them."""

    def __init__(self, tokens_per_event: int = 1) -> None:
        self._tokens_per_event = tokens_per_event
        self._ready = False
        self._active: set[str] = set()
        self._aborted: set[str] = set()
        self._tokenizer = _CharTokenizer()

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    def is_ready(self) -> bool:
        return self._ready

    def model_info(self) -> generation_pb2.ModelInfo:
        return generation_pb2.ModelInfo(model_name="synthetic", context_length=CONTEXT_LENGTH,
                                        vocab_size=VOCAB_SIZE)

    @property
    def tokenizer(self) -> _CharTokenizer:
        return self._tokenizer

    async def generate(self, inp: GenerationInput) -> AsyncIterator[TokenEvent]:
        max_tokens = inp.params.max_tokens
        num_prompt = len(inp.prompt_token_ids)
        produced = 0
        self._active.add(inp.request_id)
        try:
            while produced < max_tokens:
                if inp.request_id in self._aborted:
                    yield TokenEvent([], "", finish_reason="abort", num_prompt_tokens=num_prompt,
                                     num_output_tokens=produced, timing=Timing())
                    return
                count = min(self._tokens_per_event, max_tokens - produced)
                produced += count
                last = produced == max_tokens
                yield TokenEvent([7] * count, "x" * count, finish_reason="length" if last else None,
                                 num_prompt_tokens=num_prompt, num_output_tokens=produced,
                                 timing=Timing() if last else None)
        finally:
            self._active.discard(inp.request_id)
            self._aborted.discard(inp.request_id)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._active:
            return False
        self._aborted.add(request_id)
        return True

    async def cluster_state(self) -> list[generation_pb2.InstanceState]:
        return []


# ---- server process ---------------------------------------------------------------------------
def _serve(port_pipe, stop_event, tokens_per_event: int) -> None:
    async def main() -> None:
        router = await start_router(SyntheticBackend(tokens_per_event), "127.0.0.1", 0,
                                    http_port=0)
        port_pipe.send((router.port, router.http.port))
        while not stop_event.is_set():
            await asyncio.sleep(0.1)
        await router.stop(grace_s=1.0)

    asyncio.run(main())


# ---- client -------------------------------------------------------------------------------------
async def _stream_worker(client: PdserveClient, end_s: float, max_tokens: int,
                         gaps_s: list[float], ttfts_s: list[float]) -> tuple[int, int, int]:
    """Requests back to back until end_s; returns (tokens, messages, completed requests)."""
    num_tokens = num_messages = num_requests = 0
    while time.monotonic() < end_s:
        last_s = time.monotonic()
        first = True
        async for response in client.generate_stream(prompt_token_ids=[1, 2, 3],
                                                     max_tokens=max_tokens, ignore_eos=True):
            now = time.monotonic()
            (ttfts_s if first else gaps_s).append(now - last_s)
            first = False
            last_s = now
            num_tokens += len(response.token_ids)
            num_messages += 1
        num_requests += 1
    return num_tokens, num_messages, num_requests


async def _http_worker(session, url: str, end_s: float, max_tokens: int, gaps_s: list[float],
                       ttfts_s: list[float]) -> tuple[int, int, int]:
    """As _stream_worker, over POST /v1/completions with SSE."""
    num_tokens = num_messages = num_requests = 0
    body = {"model": "synthetic", "prompt": [1, 2, 3], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    while time.monotonic() < end_s:
        last_s = time.monotonic()
        first = True
        async with session.post(url, json=body) as response:
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if not chunk["choices"]:
                    num_tokens += chunk["usage"]["completion_tokens"]
                    continue
                now = time.monotonic()
                (ttfts_s if first else gaps_s).append(now - last_s)
                first = False
                last_s = now
                num_messages += 1
        num_requests += 1
    return num_tokens, num_messages, num_requests


async def _measure(address: str, num_streams: int, duration_s: float, max_tokens: int,
                   http_port: int | None = None) -> dict:
    gaps_s: list[float] = []
    ttfts_s: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        if http_port is None:
            client = await stack.enter_async_context(PdserveClient(address))
            await client.model_info()  # connect before the clock starts
        else:
            import aiohttp

            client = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0)))
            url = f"http://127.0.0.1:{http_port}/v1/completions"
        start = time.monotonic()
        end_s = start + duration_s
        workers = (_stream_worker(client, end_s, max_tokens, gaps_s, ttfts_s)
                   if http_port is None else
                   _http_worker(client, url, end_s, max_tokens, gaps_s, ttfts_s)
                   for _ in range(num_streams))
        results = await asyncio.gather(*workers)
        elapsed_s = time.monotonic() - start
    tokens, messages, requests = (sum(column) for column in zip(*results))
    gaps_s.sort()
    return {"streams": num_streams, "elapsed_s": round(elapsed_s, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed_s, 1),
            "messages_per_s": round(messages / elapsed_s, 1), "requests": requests,
            "mean_ttft_ms": round(1e3 * statistics.fmean(ttfts_s), 4),
            "mean_itl_ms": round(1e3 * statistics.fmean(gaps_s), 4),
            "p99_itl_ms": round(1e3 * gaps_s[int(0.99 * (len(gaps_s) - 1))], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64],
                        help="concurrent streams; one measurement per value")
    parser.add_argument("--duration-s", type=float, default=3.0, help="per measurement")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per request")
    parser.add_argument("--tokens-per-event", type=int, default=1,
                        help="tokens per GenerateResponse (1 = every token its own message)")
    parser.add_argument("--transport", choices=("grpc", "http"), default="grpc",
                        help="grpc: Generate; http: the OpenAI API's /v1/completions (SSE)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"default {RESULT_PATH.name} (router_throughput_http_cpu.json for "
                             "--transport http) in benchmarks/results/")
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    receive_port, send_port = context.Pipe(duplex=False)
    stop_event = context.Event()
    server = context.Process(target=_serve, args=(send_port, stop_event, args.tokens_per_event),
                             daemon=True)
    server.start()
    try:
        if not receive_port.poll(60):
            raise RuntimeError("the router process did not start within 60 s")
        grpc_port, http_port = receive_port.recv()
        address = f"127.0.0.1:{grpc_port}"
        http_port = http_port if args.transport == "http" else None
        runs = [asyncio.run(_measure(address, n, args.duration_s, args.max_tokens, http_port))
                for n in args.streams]
    finally:
        stop_event.set()
        server.join(10)
    summary = {"benchmark": "router_throughput", "backend": "SyntheticBackend (no model)",
               "transport": args.transport,
               "tokens_per_event": args.tokens_per_event, "max_tokens": args.max_tokens,
               "duration_s": args.duration_s, "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "grpcio": grpc.__version__, "runs": runs}
    print(json.dumps(summary, indent=2))
    output = args.output or (RESULT_PATH if args.transport == "grpc" else
                             RESULT_PATH.with_name("router_throughput_http_cpu.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
