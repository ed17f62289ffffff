"""Hostile requests every layer must refuse with INVALID_ARGUMENT, shared by the cluster test
(tests/serving/test_cluster_hostile.py) and the soak (tests/serving/test_soak.py).

`HOSTILE_CASES` pairs each request (keyword arguments of `PdserveClient.generate_stream`, the
prompt included) with the start of the details the router answers, which names the field;
`HOSTILE` is the requests alone. `HOSTILE_WIRE` holds bytes that no client would build: a
GenerateRequest with invalid UTF-8 in a string, and bytes that are not protobuf at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protos.pdserve.v1 import generation_pb2


@dataclass(frozen=True, slots=True)
class HostileCase:
    name: str  # a test id
    request: dict[str, Any]  # PdserveClient.generate_stream keyword arguments
    field: str  # what the INVALID_ARGUMENT details start with


HOSTILE_CASES = [
    HostileCase("stop_100kb", {"prompt": "hi", "stop": ["x" * 100_000]}, "sampling.stop:"),
    HostileCase("stop_1000_strings", {"prompt": "hi", "stop": [str(i) for i in range(1000)]},
                "sampling.stop:"),
    HostileCase("request_id_1mb", {"prompt": "hi", "request_id": "r" * 1_000_000}, "request_id:"),
    HostileCase("request_id_newline", {"prompt": "hi", "request_id": "bad id\n"}, "request_id:"),
    HostileCase("temperature_inf", {"prompt": "hi", "temperature": float("inf")},
                "sampling.temperature:"),
    HostileCase("repetition_penalty_nan", {"prompt": "hi", "repetition_penalty": float("nan")},
                "sampling.repetition_penalty:"),
    HostileCase("role_hacker", {"messages": [{"role": "hacker", "content": "hi"}]},
                "messages[0].role:"),
    HostileCase("role_empty", {"messages": [{"role": "", "content": "hi"}]}, "messages[0].role:"),
    HostileCase("prompt_4mb", {"prompt": "x" * 4_000_000}, "prompt:"),
    HostileCase("prompt_empty", {"prompt": ""}, "prompt:"),
]
HOSTILE = [case.request for case in HOSTILE_CASES]


def with_invalid_utf8(request: generation_pb2.GenerateRequest, marker: bytes) -> bytes:
    """`request` on the wire with `marker` (found exactly once) replaced by invalid UTF-8."""
    wire = request.SerializeToString()
    if wire.count(marker) != 1:
        raise ValueError(f"marker {marker!r} must occur once in the request, "
                         f"found {wire.count(marker)} times")
    return wire.replace(marker, b"\xc3\x28")  # a lead byte without its continuation


HOSTILE_WIRE = [  # (test id, bytes, what the details start with)
    ("prompt_invalid_utf8",
     with_invalid_utf8(generation_pb2.GenerateRequest(prompt="QQ"), b"QQ"), "prompt:"),
    ("stop_invalid_utf8",
     with_invalid_utf8(generation_pb2.GenerateRequest(
         prompt="hi", sampling=generation_pb2.SamplingParams(stop=["ok", "QQ"])), b"QQ"),
     "sampling.stop[1]:"),
    ("garbage_bytes", b"\xff\xff\xff\xff\x0f not protobuf at all",
     "request: is not a valid GenerateRequest"),
]
