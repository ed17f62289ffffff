"""`--start-colocated` of the serving benchmark: a router in this process (gRPC, and with
`--backend openai` the OpenAI-compatible HTTP API) over one colocated engine, so the load
generator needs no cluster."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.server import RouterServer


@contextlib.asynccontextmanager
async def colocated_router(host: str, model: str, device: str, max_queued_requests: int,
                           loaded=None, max_num_seqs: int = 64,
                           async_scheduling: str = "auto", http: bool = False
                           ) -> AsyncIterator[RouterServer]:
    """A router on `host` (a free port) over one ColocatedBackend; yields it. `http` also
    serves the OpenAI-compatible HTTP API (a free port: `router.http.url`).
    `loaded` (an `engine.builder.LoadedModel`) skips loading the model again;
    `async_scheduling` is auto | on | off. torch loads only here, not with the load generator."""
    from engine.config import ASYNC_SCHEDULING_CHOICES, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine
    from router.colocated import ColocatedBackend
    from router.server import start_router

    config = EngineConfig(model=model, device=device,
                          async_scheduling=ASYNC_SCHEDULING_CHOICES[async_scheduling],
                          scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                                    max_num_batched_tokens=max(2048, max_num_seqs)))
    engine = LLMEngine(config, loaded=loaded)
    router = await start_router(ColocatedBackend(engine, max_queued_requests), host, 0,
                                http_port=0 if http else None)
    try:
        yield router
    finally:
        await router.stop(grace_s=1.0)


async def _serve_forever(args) -> None:
    async with colocated_router("127.0.0.1", args.model, args.device, args.max_queued_requests,
                                max_num_seqs=args.max_num_seqs, http=True) as router:
        print(f"gRPC on {router.address}, HTTP on {router.http.url}", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C / SIGTERM


if __name__ == "__main__":
    # One router process serving both transports over one engine, for comparing them with
    # benchmarks/serving.py --address ... and --backend openai --base-url ... (same process):
    #   .venv/bin/python -m benchmarks.serving_colocated   (from the repository root)
    import argparse
    import asyncio
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description="a colocated router with gRPC and HTTP")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-queued-requests", type=int, default=1024)
    try:
        asyncio.run(_serve_forever(parser.parse_args()))
    except KeyboardInterrupt:
        pass
