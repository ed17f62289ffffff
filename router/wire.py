"""The Generation service's wire format, parsed so that no request bytes can make it fail.

protobuf refuses a proto3 `string` field that holds invalid UTF-8 by raising `DecodeError` in
the deserializer, before any handler runs, and gRPC then answers UNKNOWN with protobuf's text,
without the router ever seeing (or counting) the call. So the service is registered here with
deserializers that never raise:

    request bytes ──parse──> the request message                       (the normal path)
                    │ fails
                    └──> parse a mirror message whose strings are `bytes`
                           ├ parses ──> `MalformedRequest(field: must be valid UTF-8)`
                           └ fails ───> `MalformedRequest(request: not a valid <Message>)`

A handler receives the `MalformedRequest` instead of its message and answers INVALID_ARGUMENT
with its error (the request validator does this for Generate), so the call is counted in the
router's metrics like any other invalid request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from protos.pdserve.v1 import generation_pb2
from router.errors import InvalidRequestError

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
# The API's names for nested fields: `messages` is a ChatMessages whose one field is a list.
_PATH_ALIASES = {"messages.messages": "messages"}


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """What a handler receives instead of a request whose bytes did not parse."""

    error: InvalidRequestError


def _bytes_mirror_pool() -> descriptor_pool.DescriptorPool:
    """generation.proto again, in a pool of its own, with every `string` field as `bytes`."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    generation_pb2.DESCRIPTOR.CopyToProto(file_proto)
    for message in file_proto.message_type:
        for field in message.field:
            if field.type == FieldDescriptor.TYPE_STRING:
                field.type = FieldDescriptor.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return pool


_MIRROR_POOL = _bytes_mirror_pool()


def lenient_deserializer(message_cls: type[Message]
                         ) -> Callable[[bytes], Message | MalformedRequest]:
    """A deserializer for `message_cls` that returns a `MalformedRequest` instead of raising."""
    mirror_cls = message_factory.GetMessageClass(
        _MIRROR_POOL.FindMessageTypeByName(message_cls.DESCRIPTOR.full_name))
    type_name = message_cls.DESCRIPTOR.name

    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return message_cls.FromString(data)
        except DecodeError:  # upb reports every parse failure as DecodeError
            pass
        try:
            mirror = mirror_cls.FromString(data)
        except DecodeError:
            return MalformedRequest(InvalidRequestError(
                "request", f"is not a valid {type_name} (the bytes do not parse)"))
        path = _invalid_utf8_path(mirror) or "request"
        return MalformedRequest(InvalidRequestError(path, "must be valid UTF-8"))

    return deserialize


def _invalid_utf8_path(message: Message, prefix: str = "") -> str | None:
    """The path of the first `bytes` field (a `string` in the real message) that is not UTF-8."""
    for field, value in message.ListFields():
        path = _PATH_ALIASES.get(prefix + field.name, prefix + field.name)
        values = value if field.is_repeated else [value]
        for index, item in enumerate(values):
            item_path = f"{path}[{index}]" if field.is_repeated else path
            found = _first_invalid(field, item, item_path)
            if found is not None:
                return found
    return None


def _first_invalid(field: FieldDescriptor, value: object, path: str) -> str | None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _invalid_utf8_path(value, path + ".")
    if field.type == FieldDescriptor.TYPE_BYTES:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return path
    return None


def add_generation_service(servicer: object, server: grpc.aio.Server) -> None:
    """Register `servicer`'s Generation methods on `server` with lenient request deserializers."""
    handlers = {method.name: _method_handler(getattr(servicer, method.name), method.input_type,
                                             method.output_type, method.server_streaming)
                for method in SERVICE.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


def _method_handler(behaviour: Callable, input_type: Descriptor, output_type: Descriptor,
                    server_streaming: bool) -> grpc.RpcMethodHandler:
    request_cls = message_factory.GetMessageClass(input_type)
    response_cls = message_factory.GetMessageClass(output_type)
    make = (grpc.unary_stream_rpc_method_handler if server_streaming
            else grpc.unary_unary_rpc_method_handler)
    return make(behaviour, request_deserializer=lenient_deserializer(request_cls),
                response_serializer=response_cls.SerializeToString)
