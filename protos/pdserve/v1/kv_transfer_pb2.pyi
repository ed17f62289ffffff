from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Handshake(_message.Message):
    __slots__ = ("protocol_version", "compat_hash", "model_name", "dtype", "block_size", "kv_layout", "num_layers", "num_kv_heads", "head_dim", "pdserve_version", "parallel_layout", "rank", "instance_id", "pair_key")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PDSERVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_KEY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    compat_hash: str
    model_name: str
    dtype: str
    block_size: int
    kv_layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    pdserve_version: str
    parallel_layout: str
    rank: int
    instance_id: str
    pair_key: str
    def __init__(self, protocol_version: _Optional[int] = ..., compat_hash: _Optional[str] = ..., model_name: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., kv_layout: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., pdserve_version: _Optional[str] = ..., parallel_layout: _Optional[str] = ..., rank: _Optional[int] = ..., instance_id: _Optional[str] = ..., pair_key: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("protocol_version", "accepted", "reason", "mismatched_fields", "handshake")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    accepted: bool
    reason: str
    mismatched_fields: _containers.RepeatedScalarFieldContainer[str]
    handshake: Handshake
    def __init__(self, protocol_version: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., mismatched_fields: _Optional[_Iterable[str]] = ..., handshake: _Optional[_Union[Handshake, _Mapping]] = ...) -> None: ...
