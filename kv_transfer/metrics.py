"""KV transfer metrics, exported by both ends of every pair (the prefill instance sends, the
decode instance receives; Prometheus's `role` target label tells the two apart).

Per transfer, from its `TransferResult`: OK adds its time, bytes and bandwidth; any other status
counts one failure under its reason (`failed`, `timeout`, `protocol_error`, `incompatible`).
Per pair channel: the handshake time (handshake, process group and probe round trip). The
worker publishes the number of transfers in flight after each engine loop iteration.
"""

from __future__ import annotations

from pdserve.metrics import MetricFactory
from protos.pdserve.v1 import worker_pb2

# A layer-streamed transfer overlaps the prefill's forward pass: milliseconds on GPUs, up to
# seconds on CPU with Gloo.
TRANSFER_TIME_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0, 10.0, 30.0, 60.0)
BANDWIDTH_BUCKETS = (1e6, 1e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10, 5e10, 1e11, 2.5e11)
HANDSHAKE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STATUS_PREFIX = "TRANSFER_STATUS_"
FAILURE_REASONS = tuple(
    worker_pb2.TransferStatus.Name(status).removeprefix(_STATUS_PREFIX).lower()
    for status in (worker_pb2.TRANSFER_STATUS_FAILED, worker_pb2.TRANSFER_STATUS_TIMEOUT,
                   worker_pb2.TRANSFER_STATUS_PROTOCOL_ERROR,
                   worker_pb2.TRANSFER_STATUS_INCOMPATIBLE))


class TransferMetrics:
    """One instance's view of its KV transfers (thread-safe: receive and finisher threads)."""

    def __init__(self, factory: MetricFactory) -> None:
        self.time = factory.histogram(
            "kv_transfer_time_seconds",
            "Successful KV transfers: begin (or header) to acknowledgement", TRANSFER_TIME_BUCKETS_S)
        self.bytes = factory.counter("kv_transfer_bytes", "KV bytes moved by successful transfers")
        self.bandwidth = factory.histogram("kv_transfer_bandwidth_bytes_per_second",
                                           "Per successful transfer: its bytes over its time",
                                           BANDWIDTH_BUCKETS)
        self.in_flight = factory.gauge("kv_transfers_in_flight",
                                       "Transfers begun (or announced) and not yet finished")
        self.failures = factory.counter_by("kv_transfer_failures",
                                           "Failed KV transfers, by TransferStatus",
                                           "reason", FAILURE_REASONS)
        self.handshake_time = factory.histogram("kv_transfer_handshake_time_seconds",
                                                "Building one pair channel, handshake included",
                                                HANDSHAKE_BUCKETS_S)

    def observe(self, result: worker_pb2.TransferResult) -> None:
        """One transfer ended with `result`."""
        if result.status != worker_pb2.TRANSFER_STATUS_OK:
            self.observe_failure(result.status)
            return
        self.time.observe(result.duration_s)
        self.bytes.inc(result.num_bytes)
        if result.duration_s > 0:
            self.bandwidth.observe(result.num_bytes / result.duration_s)

    def observe_failure(self, status: int) -> None:
        name = worker_pb2.TransferStatus.Name(status).removeprefix(_STATUS_PREFIX).lower()
        self.failures[name].inc()
