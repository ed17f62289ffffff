"""`--backend openai` of the serving benchmark: one request over the OpenAI-compatible HTTP
API (`POST /v1/completions`, streamed as server-sent events), timed as the gRPC backend times
its requests, so both backends' numbers read the same way.

The prompt goes as token ids; `stream_options.include_usage` gives the exact output token
count at the end. Each SSE chunk is one message (the router sends one chunk per token event,
which may carry several tokens when the client lags), so ITL is chunk-level as for gRPC, and
TTFT is the arrival of the first chunk with a choice.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import aiohttp


class Spec(Protocol):
    prompt_token_ids: list[int]
    max_tokens: int


class OpenAIClient:
    """One aiohttp session to the router's HTTP API, with the served model's name."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=0))  # no cap: --max-concurrency decides
        self.model = ""

    async def __aenter__(self) -> OpenAIClient:
        await self.model_name()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    async def model_name(self) -> str:
        async with self._session.get(f"{self.base_url}/v1/models") as response:
            response.raise_for_status()
            self.model = (await response.json())["data"][0]["id"]
        return self.model

    async def stream(self, spec: Spec, temperature: float, ignore_eos: bool, result):
        """Fill `result` (a serving.RequestResult) from one streamed completion; return it."""
        try:
            await self._stream(spec, temperature, ignore_eos, result)
        except (aiohttp.ClientError, TimeoutError) as error:
            result.ok, result.error = False, f"{type(error).__name__}: {error}"[:200]
        return result

    async def _stream(self, spec: Spec, temperature: float, ignore_eos: bool, result) -> None:
        body = {"model": self.model, "prompt": spec.prompt_token_ids,
                "max_tokens": spec.max_tokens, "temperature": temperature,
                "ignore_eos": ignore_eos, "stream": True,
                "stream_options": {"include_usage": True}}
        start_s = last_s = time.perf_counter()
        num_chunks = 0
        async with self._session.post(f"{self.base_url}/v1/completions", json=body) as response:
            if response.status != 200:
                error = (await response.json()).get("error", {})
                result.error = f"HTTP {response.status}: {error.get('message', '')[:200]}"
                return
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now_s = time.perf_counter()
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    result.error = chunk["error"].get("message", "error")[:200]
                    return
                if chunk["choices"]:
                    if num_chunks == 0:
                        result.ttft_s = now_s - start_s
                    else:
                        result.itls_s.append(now_s - last_s)
                    num_chunks += 1
                    last_s = now_s
                    result.e2e_s = now_s - start_s
                elif chunk.get("usage"):
                    result.num_output_tokens = chunk["usage"]["completion_tokens"]
        result.ok = result.num_output_tokens > 0
        result.error = "" if result.ok else "no token received"
