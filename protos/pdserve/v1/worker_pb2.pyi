from protos.pdserve.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATUS_UNSPECIFIED: _ClassVar[TransferStatus]
    TRANSFER_STATUS_OK: _ClassVar[TransferStatus]
    TRANSFER_STATUS_FAILED: _ClassVar[TransferStatus]
    TRANSFER_STATUS_TIMEOUT: _ClassVar[TransferStatus]
    TRANSFER_STATUS_PROTOCOL_ERROR: _ClassVar[TransferStatus]
    TRANSFER_STATUS_INCOMPATIBLE: _ClassVar[TransferStatus]

class AbortReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABORT_REASON_UNSPECIFIED: _ClassVar[AbortReason]
    ABORT_REASON_CLIENT_CANCELLED: _ClassVar[AbortReason]
    ABORT_REASON_DEADLINE_EXCEEDED: _ClassVar[AbortReason]
    ABORT_REASON_TRANSFER_FAILED: _ClassVar[AbortReason]
    ABORT_REASON_WORKER_DRAINING: _ClassVar[AbortReason]
TRANSFER_STATUS_UNSPECIFIED: TransferStatus
TRANSFER_STATUS_OK: TransferStatus
TRANSFER_STATUS_FAILED: TransferStatus
TRANSFER_STATUS_TIMEOUT: TransferStatus
TRANSFER_STATUS_PROTOCOL_ERROR: TransferStatus
TRANSFER_STATUS_INCOMPATIBLE: TransferStatus
ABORT_REASON_UNSPECIFIED: AbortReason
ABORT_REASON_CLIENT_CANCELLED: AbortReason
ABORT_REASON_DEADLINE_EXCEEDED: AbortReason
ABORT_REASON_TRANSFER_FAILED: AbortReason
ABORT_REASON_WORKER_DRAINING: AbortReason

class TransferDescriptor(_message.Message):
    __slots__ = ("protocol_version", "transfer_id", "pair_key", "pair_seq", "request_id", "num_tokens", "num_blocks", "layer_start", "layer_end", "layers_per_message")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_KEY_FIELD_NUMBER: _ClassVar[int]
    PAIR_SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    LAYERS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    transfer_id: str
    pair_key: str
    pair_seq: int
    request_id: str
    num_tokens: int
    num_blocks: int
    layer_start: int
    layer_end: int
    layers_per_message: int
    def __init__(self, protocol_version: _Optional[int] = ..., transfer_id: _Optional[str] = ..., pair_key: _Optional[str] = ..., pair_seq: _Optional[int] = ..., request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., layers_per_message: _Optional[int] = ...) -> None: ...

class TransferResult(_message.Message):
    __slots__ = ("protocol_version", "transfer_id", "request_id", "pair_seq", "status", "message", "num_bytes", "duration_s", "tail_s")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    TAIL_S_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    transfer_id: str
    request_id: str
    pair_seq: int
    status: TransferStatus
    message: str
    num_bytes: int
    duration_s: float
    tail_s: float
    def __init__(self, protocol_version: _Optional[int] = ..., transfer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., pair_seq: _Optional[int] = ..., status: _Optional[_Union[TransferStatus, str]] = ..., message: _Optional[str] = ..., num_bytes: _Optional[int] = ..., duration_s: _Optional[float] = ..., tail_s: _Optional[float] = ...) -> None: ...

class PairEndpoint(_message.Message):
    __slots__ = ("protocol_version", "prefill_instance_id", "decode_instance_id", "store_host", "store_port", "generation", "pair_key")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PAIR_KEY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    prefill_instance_id: str
    decode_instance_id: str
    store_host: str
    store_port: int
    generation: int
    pair_key: str
    def __init__(self, protocol_version: _Optional[int] = ..., prefill_instance_id: _Optional[str] = ..., decode_instance_id: _Optional[str] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., generation: _Optional[int] = ..., pair_key: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("protocol_version", "request_id", "num_prompt_tokens", "max_tokens", "prefill_instance_id", "transfer", "prompt_token_ids", "sampling", "seed", "output_token_ids", "cache_salt", "prefill_here_below_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HERE_BELOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    prefill_instance_id: str
    transfer: TransferDescriptor
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    seed: int
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    prefill_here_below_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., prefill_instance_id: _Optional[str] = ..., transfer: _Optional[_Union[TransferDescriptor, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., prefill_here_below_tokens: _Optional[int] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("protocol_version", "request_id", "accepted", "reason", "num_blocks", "num_free_blocks", "invalid", "num_cached_tokens", "prefill_here")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HERE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    accepted: bool
    reason: str
    num_blocks: int
    num_free_blocks: int
    invalid: bool
    num_cached_tokens: int
    prefill_here: bool
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., invalid: _Optional[bool] = ..., num_cached_tokens: _Optional[int] = ..., prefill_here: _Optional[bool] = ...) -> None: ...

class PrefillTask(_message.Message):
    __slots__ = ("protocol_version", "request_id", "prompt_token_ids", "sampling", "seed", "decode_instance_id", "transfer", "arrival_time_unix_s", "deadline_unix_s", "output_token_ids", "cache_salt", "num_decode_cached_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    seed: int
    decode_instance_id: str
    transfer: TransferDescriptor
    arrival_time_unix_s: float
    deadline_unix_s: float
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    num_decode_cached_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., decode_instance_id: _Optional[str] = ..., transfer: _Optional[_Union[TransferDescriptor, _Mapping]] = ..., arrival_time_unix_s: _Optional[float] = ..., deadline_unix_s: _Optional[float] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., num_decode_cached_tokens: _Optional[int] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("protocol_version", "request_id", "token_ids", "logprobs", "finish_reason", "timing", "usage", "text", "error")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    timing: _generation_pb2.Timing
    usage: _generation_pb2.Usage
    text: str
    error: str
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., timing: _Optional[_Union[_generation_pb2.Timing, _Mapping]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., text: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class DecodeOutputs(_message.Message):
    __slots__ = ("protocol_version", "instance_id", "deltas", "state")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    instance_id: str
    deltas: _containers.RepeatedCompositeFieldContainer[TokenDelta]
    state: _generation_pb2.InstanceState
    def __init__(self, protocol_version: _Optional[int] = ..., instance_id: _Optional[str] = ..., deltas: _Optional[_Iterable[_Union[TokenDelta, _Mapping]]] = ..., state: _Optional[_Union[_generation_pb2.InstanceState, _Mapping]] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("protocol_version", "request_id", "found", "transfer_begun")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BEGUN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    found: bool
    transfer_begun: bool
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., found: _Optional[bool] = ..., transfer_begun: _Optional[bool] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("protocol_version", "request_id", "first_token", "transfer", "prefill_s", "kv_events")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    first_token: TokenDelta
    transfer: TransferResult
    prefill_s: float
    kv_events: KVEvents
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., first_token: _Optional[_Union[TokenDelta, _Mapping]] = ..., transfer: _Optional[_Union[TransferResult, _Mapping]] = ..., prefill_s: _Optional[float] = ..., kv_events: _Optional[_Union[KVEvents, _Mapping]] = ...) -> None: ...

class KVEvents(_message.Message):
    __slots__ = ("protocol_version", "epoch", "seq", "stored", "evicted", "num_dropped", "is_snapshot")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    NUM_DROPPED_FIELD_NUMBER: _ClassVar[int]
    IS_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    epoch: str
    seq: int
    stored: _containers.RepeatedScalarFieldContainer[int]
    evicted: _containers.RepeatedScalarFieldContainer[int]
    num_dropped: int
    is_snapshot: bool
    def __init__(self, protocol_version: _Optional[int] = ..., epoch: _Optional[str] = ..., seq: _Optional[int] = ..., stored: _Optional[_Iterable[int]] = ..., evicted: _Optional[_Iterable[int]] = ..., num_dropped: _Optional[int] = ..., is_snapshot: _Optional[bool] = ...) -> None: ...

class DecodeTask(_message.Message):
    __slots__ = ("protocol_version", "request_id", "prompt_token_ids", "output_token_ids", "output_logprobs", "sampling", "seed", "transfer_id", "timing")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_logprobs: _containers.RepeatedScalarFieldContainer[float]
    sampling: _generation_pb2.SamplingParams
    seed: int
    transfer_id: str
    timing: _generation_pb2.Timing
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., output_logprobs: _Optional[_Iterable[float]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., transfer_id: _Optional[str] = ..., timing: _Optional[_Union[_generation_pb2.Timing, _Mapping]] = ...) -> None: ...

class AbortTask(_message.Message):
    __slots__ = ("protocol_version", "request_id", "reason", "message", "transfer_begun")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BEGUN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    request_id: str
    reason: AbortReason
    message: str
    transfer_begun: bool
    def __init__(self, protocol_version: _Optional[int] = ..., request_id: _Optional[str] = ..., reason: _Optional[_Union[AbortReason, str]] = ..., message: _Optional[str] = ..., transfer_begun: _Optional[bool] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("protocol_version", "state", "kv_cache_usage", "num_preemptions", "num_transfers_failed", "timestamp_unix_s")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_TRANSFERS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    state: _generation_pb2.InstanceState
    kv_cache_usage: float
    num_preemptions: int
    num_transfers_failed: int
    timestamp_unix_s: float
    def __init__(self, protocol_version: _Optional[int] = ..., state: _Optional[_Union[_generation_pb2.InstanceState, _Mapping]] = ..., kv_cache_usage: _Optional[float] = ..., num_preemptions: _Optional[int] = ..., num_transfers_failed: _Optional[int] = ..., timestamp_unix_s: _Optional[float] = ...) -> None: ...
