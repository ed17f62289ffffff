"""Prometheus conventions shared by every pdserve component, and the `/metrics` endpoint.

Each component kind defines its metrics in one module, over `MetricFactory`:

    router/metrics.py          the client's view: status codes, TTFT, inter-token latency, phases
    engine/metrics.py          one engine's queues, KV cache usage, preemptions
    prefill_worker/metrics.py  prompt tokens waiting, tokens per step, queue and prefill time
    decode_worker/metrics.py   batch size, decode time
    kv_transfer/metrics.py     transfer time, bytes, bandwidth, failures, handshakes

Every metric is named `pdserve:<name>` in base units (seconds, bytes; ratios 0..1; counters get
`_total` from prometheus_client) and carries `model_name`; no label holds a per-request value.
Metrics live in a registry of their own component instance, never in prometheus_client's global
one, so that a router and its workers can share a process (tests) without colliding. Where a
quantity is one vLLM exports, the name has vLLM's shape and the buckets include all of vLLM's,
so a user's vLLM dashboard queries keep working (`le="0.3"` exists here too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

PREFIX = "pdserve:"
MODEL_NAME_LABEL = "model_name"

# The `*_created` series prometheus_client adds to every counter and histogram double the
# series count and no dashboard reads them (vLLM turns them off too). A process-wide switch.
disable_created_metrics()

# vLLM's time_to_first_token_seconds buckets.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# vLLM's inter_token_latency_seconds buckets, reaching down to 1 ms: GPU decode steps take a few.
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's request latency buckets (e2e, queue, prefill, decode time), with TTFT's finer low end:
# a request's queue or prefill time is often a few milliseconds.
REQUEST_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.3, 0.5,
                             0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                             60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# What /metrics answers, whatever the scraper asks for: Prometheus's classic text format keeps
# the `pdserve:` names. prometheus_client's OpenMetrics output (which Prometheus prefers) turns
# the colon into an underscore in sample names but not in TYPE lines (client_python #1177), so
# Prometheus would store `pdserve_...` and no `pdserve:` query would match.
_TEXT_FORMAT = "text/plain; version=0.0.4"

M = TypeVar("M", Counter, Gauge, Histogram)


class ByLabel(Generic[M]):
    """The children of a metric with one label besides `model_name`, one per value.

    The values known up front get their series at creation, exported as 0 from the first scrape,
    so `rate()` sees their first increment; another value gets its series when first used.
    """

    def __init__(self, parent: M, model_name: str, values: Iterable[str],
                 fixed: Sequence[str] = ()) -> None:
        self._parent = parent
        self._leading = (model_name, *fixed)  # the values of the labels before this one
        self._children = {value: parent.labels(*self._leading, value) for value in values}

    def __getitem__(self, value: str) -> M:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._parent.labels(*self._leading, value)
        return child


class MetricFactory:
    """Builds `pdserve:` metrics for one model in one registry; returns the labelled children,
    so the hot path never looks a label up."""

    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        self.model_name = model_name
        self.registry = registry

    def counter(self, name: str, documentation: str) -> Counter:
        return self._new(Counter, name, documentation).labels(self.model_name)

    def gauge(self, name: str, documentation: str) -> Gauge:
        return self._new(Gauge, name, documentation).labels(self.model_name)

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return self._new(Histogram, name, documentation, buckets=buckets).labels(self.model_name)

    def counter_by(self, name: str, documentation: str, label: str,
                   values: Iterable[str]) -> ByLabel[Counter]:
        parent = self._new(Counter, name, documentation, label)
        return ByLabel(parent, self.model_name, values)

    def counter_by_each(self, name: str, documentation: str, outer_label: str,
                        outer_values: Iterable[str], label: str,
                        values: Iterable[str]) -> dict[str, ByLabel[Counter]]:
        """A counter with two labels: for each `outer_label` value, its children by `label`."""
        parent = self._new(Counter, name, documentation, outer_label, label)
        values = tuple(values)
        return {outer: ByLabel(parent, self.model_name, values, (outer,))
                for outer in outer_values}

    def histogram_by(self, name: str, documentation: str, label: str, values: Iterable[str],
                     buckets: Sequence[float]) -> ByLabel[Histogram]:
        parent = self._new(Histogram, name, documentation, label, buckets=buckets)
        return ByLabel(parent, self.model_name, values)

    def _new(self, kind: type[M], name: str, documentation: str, *labels: str, **kwargs) -> M:
        return kind(PREFIX + name, documentation, (MODEL_NAME_LABEL, *labels),
                    registry=self.registry, **kwargs)


@dataclass(slots=True)
class MetricsEndpoint:
    """A running `/metrics` HTTP server (on a daemon thread, a thread per request)."""

    host: str
    port: int  # the bound port (the OS's pick when 0 was asked for)
    _server: ThreadingWSGIServer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve `registry` at http://host:port/metrics (port 0: any free port), always in the
    classic text format (see _TEXT_FORMAT)."""
    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        environ["HTTP_ACCEPT"] = _TEXT_FORMAT
        return exposition(environ, start_response)

    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise OSError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; choose "
                      "another port (0 = any free port)") from exc
    threading.Thread(target=server.serve_forever, name=f"metrics-{server.server_port}",
                     daemon=True).start()
    endpoint = MetricsEndpoint(host, server.server_port, server)
    log.info("Prometheus metrics on http://%s/metrics", endpoint.address)
    return endpoint
