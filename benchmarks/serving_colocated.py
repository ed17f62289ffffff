"""`--start-colocated` of the serving benchmark: a gRPC router in this process over one
colocated engine, so the load generator needs no cluster."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def colocated_router(host: str, model: str, device: str, max_queued_requests: int,
                           loaded=None, max_num_seqs: int = 64,
                           async_scheduling: str = "auto") -> AsyncIterator[str]:
    """A router on `host` (a free port) over one ColocatedBackend; yields its address.
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
    router = await start_router(ColocatedBackend(engine, max_queued_requests), host, 0)
    try:
        yield router.address
    finally:
        await router.stop(grace_s=1.0)
