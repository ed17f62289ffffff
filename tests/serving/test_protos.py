"""The committed protobuf code is fresh, importable, and every message survives a round trip."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from protos import generate
from protos.pdserve.v1 import PROTOCOL_VERSION, generation_pb2, generation_pb2_grpc
from protos.pdserve.v1 import kv_transfer_pb2, worker_pb2

MODULES = (generation_pb2, worker_pb2, kv_transfer_pb2)
SCALAR_SAMPLES = {
    FieldDescriptor.TYPE_STRING: "x\u00e9",
    FieldDescriptor.TYPE_BYTES: b"\x00\xff",
    FieldDescriptor.TYPE_BOOL: True,
    FieldDescriptor.TYPE_FLOAT: 0.5,
    FieldDescriptor.TYPE_DOUBLE: 1.25,
    FieldDescriptor.TYPE_UINT32: 2**32 - 1,
    FieldDescriptor.TYPE_UINT64: 2**64 - 1,
    FieldDescriptor.TYPE_INT32: -7,
    FieldDescriptor.TYPE_INT64: -(2**40),
}


def test_committed_code_matches_a_fresh_generation(tmp_path: Path):
    fresh = generate.generate(tmp_path)
    committed = generate.generated_files(generate.REPO_ROOT)
    on_disk = sorted(p.name for p in generate.PROTO_DIR.iterdir() if "_pb2" in p.name)
    assert on_disk == sorted(p.name for p in committed), "stale generated files left behind"
    for new, old in zip(fresh, committed):
        assert new.read_bytes() == old.read_bytes(), (
            f"{old.relative_to(generate.REPO_ROOT)} is stale: run `python protos/generate.py`"
        )


def fill(descriptor: Descriptor, depth: int = 0) -> Message:
    """An instance of `descriptor` with every field set (the last member of each oneof wins)."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        value = _sample(field, depth)
        if value is None:
            continue
        if field.is_repeated:
            target = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                target.add().CopyFrom(value)
            else:
                target.extend([value, value])
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(value)
        else:
            setattr(message, field.name, value)
    return message


def _sample(field: FieldDescriptor, depth: int):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return fill(field.message_type, depth + 1) if depth < 3 else None
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return SCALAR_SAMPLES[field.type]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_message_round_trips(module):
    names = sorted(module.DESCRIPTOR.message_types_by_name)
    assert names
    for name in names:
        message = fill(module.DESCRIPTOR.message_types_by_name[name])
        decoded = type(message).FromString(message.SerializeToString())
        assert decoded == message, name
        assert pickle.loads(pickle.dumps(message)) == message, name  # Ray passes them pickled


def test_sampling_fields_distinguish_absent_from_zero():
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=generation_pb2.TokenIds(token_ids=[1, 2]),
        sampling=generation_pb2.SamplingParams(temperature=0.0),
    )
    decoded = generation_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.WhichOneof("input") == "prompt_token_ids"
    assert decoded.sampling.HasField("temperature") and not decoded.sampling.HasField("top_p")
    assert not decoded.HasField("request_id")


def test_generation_service_shape():
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "pdserve.v1.Generation"
    methods = {m.name: m for m in service.methods}
    assert sorted(methods) == ["Abort", "DrainInstance", "Generate", "GetClusterState",
                              "GetModelInfo"]
    assert methods["Generate"].server_streaming and not methods["Abort"].server_streaming
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
    assert hasattr(generation_pb2_grpc, "add_GenerationServicer_to_server")


def test_control_messages_carry_a_protocol_version():
    for name, descriptor in worker_pb2.DESCRIPTOR.message_types_by_name.items():
        assert "protocol_version" in descriptor.fields_by_name, name
    assert PROTOCOL_VERSION >= 1
