"""A small asyncio client for pdserve's Generation service (the CLI, tests and benchmarks use it).

    async with PdserveClient("127.0.0.1:50051") as client:
        async for response in client.generate_stream("Hello", max_tokens=32, temperature=0):
            print(response.text, end="", flush=True)

`generate_stream` returns the gRPC call itself: iterate it for responses, `cancel()` it to abort
the request server-side. Sampling keyword arguments are `SamplingParams` proto fields; None
means "absent" (the server's default). gRPC failures surface as `grpc.aio.AioRpcError`.

A router with TLS takes `root_cert_file` (its CA; mutual TLS also `client_cert_file` and
`client_key_file`); one with tokens takes `token`, sent as `authorization: Bearer` metadata on
every call (use the admin token for Abort, GetClusterState and DrainInstance when the server
sets one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc
from router.tls import channel_credentials

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(slots=True)
class Completion:
    """A whole streamed generation, collected."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    num_messages: int = 0  # GenerateResponse messages received
    usage: generation_pb2.Usage = field(default_factory=generation_pb2.Usage)
    timing: generation_pb2.Timing = field(default_factory=generation_pb2.Timing)

    def add(self, response: generation_pb2.GenerateResponse) -> None:
        self.request_id = response.request_id
        self.token_ids += response.token_ids
        self.text += response.text
        self.logprobs += response.logprobs
        self.num_messages += 1
        if response.finish_reason:
            self.finish_reason = response.finish_reason
            self.usage = response.usage
            self.timing = response.timing

    def to_json_dict(self) -> dict:
        return {"request_id": self.request_id, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.usage.prompt_tokens,
                          "completion_tokens": self.usage.completion_tokens},
                "timing": {f.name: getattr(self.timing, f.name)
                           for f in self.timing.DESCRIPTOR.fields}}


def build_request(prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                  prompt_token_ids: Sequence[int] | None = None, request_id: str | None = None,
                  cache_salt: str | None = None,
                  **sampling: object) -> generation_pb2.GenerateRequest:
    """A GenerateRequest from at most one input; sampling fields set to None stay absent."""
    request = generation_pb2.GenerateRequest(
        sampling=generation_pb2.SamplingParams(
            **{name: value for name, value in sampling.items() if value is not None}))
    if request_id is not None:
        request.request_id = request_id
    if cache_salt is not None:
        request.cache_salt = cache_salt
    if prompt is not None:
        request.prompt = prompt
    if messages is not None:
        request.messages.messages.extend(generation_pb2.ChatMessage(**m) for m in messages)
    if prompt_token_ids is not None:
        request.prompt_token_ids.token_ids.extend(prompt_token_ids)
    return request


class PdserveClient:
    """One channel to a pdserve router and the Generation stub over it.

    `tls` (or any of the certificate files) makes the channel TLS; `token` is sent on every call.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, tls: bool = False,
                 root_cert_file: str | None = None, client_cert_file: str | None = None,
                 client_key_file: str | None = None, token: str | None = None) -> None:
        self.address = address
        if tls or root_cert_file or client_cert_file or client_key_file:
            credentials = channel_credentials(root_cert_file, client_cert_file, client_key_file)
            self._channel = grpc.aio.secure_channel(address, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def __aenter__(self) -> PdserveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate_stream(self, prompt: str | None = None, *, timeout_s: float | None = None,
                        **kwargs: object) -> grpc.aio.UnaryStreamCall:
        """Start a Generate call; `kwargs` are `build_request`'s."""
        return self._stub.Generate(build_request(prompt, **kwargs), timeout=timeout_s,
                                   metadata=self._metadata)

    async def generate(self, prompt: str | None = None, *, timeout_s: float | None = None,
                       **kwargs: object) -> Completion:
        """Run a Generate call to the end and return everything it streamed."""
        completion = Completion()
        async for response in self.generate_stream(prompt, timeout_s=timeout_s, **kwargs):
            completion.add(response)
        return completion

    async def abort(self, request_id: str) -> bool:
        response = await self._stub.Abort(generation_pb2.AbortRequest(request_id=request_id),
                                          metadata=self._metadata)
        return response.found

    async def model_info(self) -> generation_pb2.ModelInfo:
        return await self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(),
                                             metadata=self._metadata)

    async def drain_instance(self, instance_id: str, timeout_s: float | None = None
                             ) -> generation_pb2.DrainInstanceResponse:
        """Take one instance out of service (an admin call); answers once it is gone."""
        request = generation_pb2.DrainInstanceRequest(instance_id=instance_id)
        if timeout_s is not None:
            request.timeout_s = timeout_s
        return await self._stub.DrainInstance(request, metadata=self._metadata)

    async def cluster_state(self) -> generation_pb2.ClusterState:
        return await self._stub.GetClusterState(generation_pb2.GetClusterStateRequest(),
                                                metadata=self._metadata)
