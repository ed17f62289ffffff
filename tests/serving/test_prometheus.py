"""Metrics end to end, against a real Prometheus: a 1 prefill + 1 decode CPU cluster started as
`pdserve serve` starts it writes its file_sd file; a Prometheus binary (run by this test on
temporary files and a free port, from deploy/prometheus.yml with 1 s intervals) discovers the
router and both workers through it and scrapes them while a bounded load runs (finished,
aborted, cancelled and invalid requests, and one whose KV transfer is made to fail). Then every
PromQL query of the Grafana dashboard is evaluated through Prometheus's HTTP API and must return
data, and the values must agree with what the client measured and with each other across
components.

Prometheus comes from the Debian package (tests/serving/install_prometheus.sh, `make
prometheus`); the fixture installs it when it is missing and we are root, and skips otherwise.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import cluster.serve
from kv_transfer import FaultInjection
from kv_transfer.metrics import TRANSFER_TIME_BUCKETS_S
from pdserve.metrics import ITL_BUCKETS_S, REQUEST_LATENCY_BUCKETS_S, TTFT_BUCKETS_S
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness
from tests.serving.prometheus_server import Prometheus, free_port, wait_for
from tests.serving.prometheus_server import prometheus_binary  # noqa: F401 (a fixture)
from tests.serving.test_metrics import DASHBOARD, dashboard_exprs

pytestmark = pytest.mark.timeout(300)

NUM_FINISHED = 8  # requests that run to max_tokens
MAX_TOKENS = 10
TRANSFER_TIMEOUT_S = 3.0  # the failing transfer takes this long
SLACK_S = 0.05  # the router observes a little before the client receives


# ---- the cluster, Prometheus and the load -----------------------------------------------------
@pytest.fixture(scope="module")
def sd_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd") / "prometheus_sd.json"


@pytest.fixture(scope="module")
def serving(sd_file):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.serve, "TARGETS_REFRESH_S", 0.5)  # so the follow test is quick
        with local_ray():
            harness = start_disagg_harness(cluster_config(
                1, 1, transfer_timeout_s=TRANSFER_TIMEOUT_S, prometheus_sd_file=str(sd_file)))
            yield harness
            harness.close()
    assert json.loads(sd_file.read_text()) == [], "a stopped cluster leaves no targets"


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, serving, sd_file, tmp_path_factory):
    server = Prometheus(prometheus_binary, sd_file, tmp_path_factory.mktemp("prometheus"))
    try:
        server.wait_ready()
        # Every target scraped once before the load, so rate() sees all of it.
        wait_for(lambda: _healthy_targets(server) == 3, 60, "three healthy targets")
        yield server
    finally:
        server.stop()


def _healthy_targets(server: Prometheus) -> int:
    targets = server.api("targets", state="active")["activeTargets"]
    return sum(t["health"] == "up" for t in targets)


@dataclass
class ClientView:
    """What the client measured; times in seconds."""

    started_wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)  # every call that got a token
    gaps_s: list[float] = field(default_factory=list)  # per token after the first message
    tpot_s: list[float] = field(default_factory=list)  # every call that finished
    e2e_s: list[float] = field(default_factory=list)
    timings: list = field(default_factory=list)  # the Timing of every finished call
    finish_reasons: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)  # every call's final status
    num_tokens: int = 0

    @property
    def kv_transfer_s(self) -> list[float]:
        return [t.kv_transfer_s for t in self.timings if t.kv_transfer_s > 0]


async def _timed_call(client, view: ClientView, prompt: str, abort_id: str | None = None,
                      cancel: bool = False, max_tokens: int = MAX_TOKENS) -> str:
    """One Generate call, measured as its client sees it; returns its final status code."""
    started = time.monotonic()
    call = client.generate_stream(prompt, max_tokens=max_tokens, ignore_eos=True,
                                  temperature=0.0, request_id=abort_id)
    first = last = None
    num_tokens = 0
    code = "OK"
    try:
        async for response in call:
            now = time.monotonic()
            if response.token_ids:
                if first is None:
                    first = now
                    view.ttft_s.append(now - started)
                else:
                    gap_s = (now - last) / len(response.token_ids)
                    view.gaps_s += [gap_s] * len(response.token_ids)
                last = now
                num_tokens += len(response.token_ids)
            if num_tokens and cancel:
                call.cancel()
                code = "CANCELLED"
                break
            if num_tokens and abort_id is not None and num_tokens == len(response.token_ids):
                assert await client.abort(abort_id)
            if response.finish_reason:
                view.finish_reasons.append(response.finish_reason)
                view.e2e_s.append(now - started)
                view.timings.append(response.timing)
                if num_tokens > 1:
                    view.tpot_s.append((last - first) / (num_tokens - 1))
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    view.num_tokens += num_tokens
    view.codes.append(code)
    return code


async def _invalid_call(client, view: ClientView) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.generate("Hello", max_tokens=0)
    view.codes.append(info.value.code().name)


async def _failed_transfer_then_recovery(serving, view: ClientView) -> None:
    """A call whose KV transfers stall on every channel (UNAVAILABLE once its moves are used
    up), then calls until the rebuilt pair works."""
    prefill = serving.backend.pools.prefill[0].actor
    await prefill.set_faults.remote(FaultInjection(drop_after_layers=5), True)
    try:
        assert await _timed_call(serving.client, view, "Hello there!") == "UNAVAILABLE"
    finally:
        await prefill.set_faults.remote(FaultInjection(), True)
    deadline = time.monotonic() + 30
    while await _timed_call(serving.client, view, "Hi!", max_tokens=4) != "OK":
        assert time.monotonic() < deadline, "the KV channel was not rebuilt within 30 s"
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def load(serving, prometheus) -> ClientView:
    """Finished, aborted, cancelled and invalid calls, then a failed KV transfer; returns once
    Prometheus has scraped every target after the last of them."""
    view = ClientView(started_wall_s=time.time())
    prompts = [f"Write a short poem about the number {n}." for n in range(NUM_FINISHED)]

    async def run() -> None:
        client = serving.client
        await asyncio.gather(*(_timed_call(client, view, p) for p in prompts),
                             _timed_call(client, view, "Tell me a story.", abort_id="to-abort"),
                             # long, so that its decode cannot finish (and be counted as
                             # finished by the decode worker) before the cancel reaches it
                             _timed_call(client, view, "Tell me a joke.", cancel=True,
                                         max_tokens=20 * MAX_TOKENS),
                             _invalid_call(client, view))
        await _failed_transfer_then_recovery(serving, view)

    serving.run(run(), timeout_s=150)
    serving.wait_until_idle()
    ended_wall_s = time.time()
    wait_for(lambda: prometheus.value('min(timestamp(up{job="pdserve"}))') > ended_wall_s + 0.5,
             30, "a scrape of every target after the load")
    return view


# ---- helpers for comparing histograms with the client -------------------------------------------
def bucket_bounds(buckets, low: float, high: float) -> tuple[float, float]:
    """Where histogram_quantile can put a quantile of samples that all lie in [low, high]: from
    the bound below `low`'s bucket to the bound above `high`'s."""
    lower = max((b for b in buckets if b < low), default=0.0)
    upper = min((b for b in buckets if b >= high), default=math.inf)
    return lower, upper


def substitute(expr: str, window: str, model_name: str) -> str:
    return (expr.replace("$__rate_interval", window).replace("$model_name", model_name)
            .replace("$instance", ".*"))


def _window(view: ClientView) -> str:
    """A rate() window that covers the whole load (and a scrape before it)."""
    return f"{math.ceil(time.time() - view.started_wall_s) + 10}s"


@pytest.fixture(scope="module")
def model_name(serving) -> str:
    return serving.backend.model_info().model_name


# ---- the tests --------------------------------------------------------------------------------
def test_prometheus_finds_every_component_through_the_sd_file(serving, prometheus, sd_file):
    listed = json.loads(sd_file.read_text())
    expected = {(g["labels"]["role"], g["labels"]["instance"], g["targets"][0]) for g in listed}
    targets = prometheus.api("targets", state="active")["activeTargets"]
    found = {(t["labels"]["role"], t["labels"]["instance"],
              t["discoveredLabels"]["__address__"]) for t in targets}
    assert found == expected
    assert {role for role, _, _ in found} == {"router", "prefill", "decode"}
    assert all(t["health"] == "up" and t["labels"]["job"] == "pdserve" for t in targets)


def test_every_dashboard_query_returns_data(prometheus, load, model_name):
    window = _window(load)
    empty = []
    for title, expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        result = prometheus.query(substitute(expr, window, model_name))
        values = [float(r["value"][1]) for r in result]
        if not values or not all(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {values}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_dashboard_values_agree_with_the_client(prometheus, load, model_name):
    window = _window(load)
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]
              if p["type"] != "row"}

    def panel_values(title: str, legend: str) -> dict[str, float]:
        """The query behind one legend of one panel: {role or "": value}."""
        target = next(t for t in panels[title]["targets"] if t["legendFormat"] == legend)
        result = prometheus.query(substitute(target["expr"], window, model_name))
        assert result, (title, legend)
        return {r["metric"].get("role", ""): float(r["value"][1]) for r in result}

    def check(title: str, buckets, client_s: list[float]) -> None:
        """p50 within the buckets that hold the client's values; the mean close to theirs."""
        lower, upper = bucket_bounds(buckets, min(client_s) - SLACK_S, max(client_s) + SLACK_S)
        (p50,) = panel_values(title, "p50").values()
        assert lower <= p50 <= upper, (title, p50, sorted(client_s))
        (mean,) = panel_values(title, "mean").values()
        client_mean = sum(client_s) / len(client_s)
        assert abs(mean - client_mean) <= SLACK_S + 0.1 * client_mean, (title, mean, client_mean)

    check("Time to first token", TTFT_BUCKETS_S, load.ttft_s)
    check("Time per output token (TPOT)", ITL_BUCKETS_S, load.tpot_s)
    check("Inter-token latency", ITL_BUCKETS_S, load.gaps_s)
    check("End-to-end request latency", REQUEST_LATENCY_BUCKETS_S, load.e2e_s)
    # The decode side's transfer times are what the finished calls' Timing reported.
    lower, upper = bucket_bounds(TRANSFER_TIME_BUCKETS_S, min(load.kv_transfer_s),
                                 max(load.kv_transfer_s))
    assert lower <= panel_values("KV transfer latency", "{{role}} p50")["decode"] <= upper
    for title, legend in (("KV transfer bandwidth", "{{role}} {{instance}} throughput"),
                          ("KV transfer bandwidth", "{{role}} per transfer p50"),
                          ("Request throughput", "finished"), ("Token throughput", "prompt"),
                          ("Token throughput", "generation")):
        assert all(v > 0 for v in panel_values(title, legend).values()), (title, legend)
    errors = prometheus.query(substitute(
        panels["Errors by gRPC status code"]["targets"][0]["expr"], window, model_name))
    failing = {r["metric"]["code"] for r in errors if float(r["value"][1]) > 0}
    assert failing == set(load.codes) - {"OK"}
    failures = prometheus.query(substitute(
        panels["KV transfer failures and transfers in flight"]["targets"][0]["expr"], window,
        model_name))
    assert {r["metric"]["role"] for r in failures if float(r["value"][1]) > 0} == {
        "prefill", "decode"}


def test_counts_agree_across_components(prometheus, load, model_name):
    def total(series: str, **labels: str) -> float:
        matchers = [f'model_name="{model_name}"'] + [f'{k}="{v}"' for k, v in labels.items()]
        selector = ",".join(matchers)
        return prometheus.value(f"sum({series}{{{selector}}})")

    codes = set(load.codes)
    assert {"OK", "CANCELLED", "INVALID_ARGUMENT", "UNAVAILABLE"} <= codes
    for code in codes:
        assert total("pdserve:router_requests_total", code=code) == load.codes.count(code), code
    assert total("pdserve:router_request_errors_total") == len(load.codes) - load.codes.count("OK")
    assert total("pdserve:router_request_errors_total", error_type="cancelled") == 1
    assert total("pdserve:router_request_errors_total", error_type="invalid_request") == 1
    assert total("pdserve:router_request_errors_total", error_type="request_failed") >= 1
    for reason in ("length", "abort"):
        assert total("pdserve:request_success_total", finished_reason=reason) == (
            load.finish_reasons.count(reason))
    assert total("pdserve:time_to_first_token_seconds_count") == len(load.ttft_s)
    assert total("pdserve:e2e_request_latency_seconds_count") == len(load.e2e_s)
    assert total("pdserve:generation_tokens_total") >= load.num_tokens
    # The router's phases are observed from the Timing each finished call received.
    prefilled_timings = [t for t in load.timings if t.prefill_s > 0]
    for phase, client in (("queue", [t.queue_s for t in prefilled_timings]),
                          ("prefill", [t.prefill_s for t in prefilled_timings]),
                          ("kv_transfer", load.kv_transfer_s)):
        assert total("pdserve:request_phase_seconds_count", phase=phase) == len(client), phase
        assert total("pdserve:request_phase_seconds_sum", phase=phase) == pytest.approx(
            sum(client), rel=1e-9, abs=1e-12), phase
    # Workers: every prompt prefilled once; each successful transfer seen from both ends.
    prefilled = total("pdserve:request_prefill_time_seconds_count", role="prefill")
    assert prefilled >= len(load.ttft_s)
    assert total("pdserve:iteration_tokens_total_sum", role="prefill") >= total(
        "pdserve:prompt_tokens_total", role="router")
    transfers = total("pdserve:kv_transfer_time_seconds_count", role="decode")
    assert transfers == total("pdserve:kv_transfer_time_seconds_count", role="prefill")
    # Every finished call's transfer, plus the cancelled call's (cancelled after its first
    # token: its KV was on the way). The aborted call's last message carries the decode side's
    # transfer time only when that delta beats the router's abort marker, so it may be among
    # kv_transfer_s or not; either way every call of the first round moved its KV.
    assert transfers >= len(load.kv_transfer_s) + 1
    assert transfers >= NUM_FINISHED + 2  # + the aborted and the cancelled call
    assert total("pdserve:kv_transfer_time_seconds_sum", role="decode") >= sum(load.kv_transfer_s)
    sent = total("pdserve:kv_transfer_bytes_total", role="prefill")
    assert sent > 0 and sent == total("pdserve:kv_transfer_bytes_total", role="decode")
    assert total("pdserve:kv_transfer_failures_total", role="decode", reason="timeout") >= 1
    assert total("pdserve:kv_transfer_failures_total", role="prefill") >= 1
    for role in ("prefill", "decode"):  # the first pairing, then the rebuild after the failure
        assert total("pdserve:kv_transfer_handshake_time_seconds_count", role=role) >= 2
    assert total("pdserve:request_decode_time_seconds_count", role="decode") == (
        load.finish_reasons.count("length"))
    assert total("pdserve:decode_batch_size_sum") >= NUM_FINISHED * (MAX_TOKENS - 1)
    # Idle again: nothing in flight, nothing queued, every decode block free.
    for series in ("pdserve:router_num_requests_in_flight", "pdserve:router_num_requests_waiting",
                   "pdserve:num_requests_running", "pdserve:num_requests_waiting",
                   "pdserve:kv_transfers_in_flight", "pdserve:kv_cache_usage_perc"):
        assert total(series) == 0, series


def test_dashboard_variables_resolve(prometheus, load, model_name):
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    for name, expected in (("model_name", {model_name}), ("instance", {"prefill-0", "decode-0"})):
        selector, label = variables[name]["definition"].removeprefix("label_values(")[:-1].rsplit(
            ", ", 1)
        values = prometheus.api(f"label/{label}/values", **{"match[]": substitute(
            selector, "1m", model_name)})
        assert set(values) == expected, name


def test_targets_follow_instances_as_they_come_and_go(serving, prometheus, sd_file):
    """An instance joining the pools appears in the file and in Prometheus; leaving, it goes."""
    from cluster.pools import Worker
    from cluster.worker_spec import WorkerSpec

    pools = serving.backend.pools
    spec = WorkerSpec("prefill-9", "prefill", pools.prefill[0].spec.engine)
    newcomer = Worker(spec, actor=None, metrics_address=f"127.0.0.1:{free_port()}")

    def instances() -> set[str]:
        targets = prometheus.api("targets", state="active")["activeTargets"]
        return {t["labels"]["instance"] for t in targets}

    pools.prefill.append(newcomer)
    try:
        wait_for(lambda: "prefill-9" in instances(), 30, "the new instance's target")
    finally:
        pools.prefill.remove(newcomer)
    wait_for(lambda: "prefill-9" not in instances(), 30, "the instance's target to go")
    assert {g["labels"]["instance"] for g in json.loads(sd_file.read_text())} == {
        "router-0", "prefill-0", "decode-0"}
