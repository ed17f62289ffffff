"""Prometheus metrics, fast checks: the exact names and label sets of every component (a rename
is a visible decision: change the lists below with it), the conventions they follow, the router's
metrics over a real colocated backend, the file_sd file, and the dashboard and deploy files that
read them. tests/serving/test_prometheus.py checks it all end to end against a real Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry

from cluster.cluster_metrics import ClusterMetrics, InstanceStatusCollector
from cluster.config import ServerConfig
from cluster.lifecycle import Supervisor
from cluster.metrics_sd import MetricsTarget, PrometheusTargetsFile
from cluster.pools import Worker, worker_specs
from decode_worker.metrics import DecodeMetrics
from pdserve.metrics import ITL_BUCKETS_S, REQUEST_LATENCY_BUCKETS_S, TTFT_BUCKETS_S
from prefill_worker.metrics import PrefillMetrics
from router.colocated import ColocatedBackend
from router.metrics import RouterMetrics
from tests.helpers import build_engine
from tests.serving.disagg_cluster import cluster_config
from tests.serving.harness import ServerHarness

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pdserve.json"
DS_PROMETHEUS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# ---- the explicit list: exported name -> (type, labels) -----------------------------------------
M = "model_name"
ROUTER_METRICS = {
    "pdserve:router_requests_total": ("counter", {M, "transport", "code"}),
    "pdserve:router_request_errors_total": ("counter", {M, "transport", "error_type"}),
    "pdserve:request_success_total": ("counter", {M, "finished_reason"}),
    "pdserve:router_num_requests_in_flight": ("gauge", {M}),
    "pdserve:router_num_requests_waiting": ("gauge", {M}),
    "pdserve:prompt_tokens_total": ("counter", {M}),
    "pdserve:generation_tokens_total": ("counter", {M}),
    "pdserve:time_to_first_token_seconds": ("histogram", {M}),
    "pdserve:inter_token_latency_seconds": ("histogram", {M}),
    "pdserve:request_time_per_output_token_seconds": ("histogram", {M}),
    "pdserve:e2e_request_latency_seconds": ("histogram", {M}),
    "pdserve:request_phase_seconds": ("histogram", {M, "phase"}),
}
ENGINE_METRICS = {
    "pdserve:num_requests_running": ("gauge", {M}),
    "pdserve:num_requests_waiting": ("gauge", {M}),
    "pdserve:kv_cache_usage_perc": ("gauge", {M}),
    "pdserve:num_preemptions_total": ("counter", {M}),
    "pdserve:prefix_cache_queries_total": ("counter", {M}),
    "pdserve:prefix_cache_hits_total": ("counter", {M}),
    "pdserve:prefix_cache_evictions_total": ("counter", {M}),
    "pdserve:spec_decode_num_drafts_total": ("counter", {M}),
    "pdserve:spec_decode_num_draft_tokens_total": ("counter", {M}),
    "pdserve:spec_decode_num_accepted_tokens_total": ("counter", {M}),
    "pdserve:triton_compiles_after_ready_total": ("counter", {M}),
}
TRANSFER_METRICS = {
    "pdserve:kv_transfer_time_seconds": ("histogram", {M}),
    "pdserve:kv_transfer_bytes_total": ("counter", {M}),
    "pdserve:kv_transfer_bandwidth_bytes_per_second": ("histogram", {M}),
    "pdserve:kv_transfers_in_flight": ("gauge", {M}),
    "pdserve:kv_transfer_failures_total": ("counter", {M, "reason"}),
    "pdserve:kv_transfer_handshake_time_seconds": ("histogram", {M}),
}
PREFILL_METRICS = ENGINE_METRICS | TRANSFER_METRICS | {
    "pdserve:num_prompt_tokens_waiting": ("gauge", {M}),
    "pdserve:iteration_tokens_total": ("histogram", {M}),
    "pdserve:request_queue_time_seconds": ("histogram", {M}),
    "pdserve:request_prefill_time_seconds": ("histogram", {M}),
}
DECODE_METRICS = ENGINE_METRICS | TRANSFER_METRICS | {
    "pdserve:decode_batch_size": ("histogram", {M}),
    "pdserve:request_decode_time_seconds": ("histogram", {M}),
}
# A disaggregated cluster's router also serves its supervisor's and backend's series
# (cluster/cluster_metrics.py); `instance_id`/`pool`, not `instance`/`role`: those are the
# scrape target's labels.
CLUSTER_METRICS = {
    "pdserve:instance_status": ("gauge", {M, "instance_id", "pool", "status"}),
    "pdserve:instance_restarts_total": ("counter", {M, "instance_id", "pool"}),
    "pdserve:instance_restart_failures_total": ("counter", {M, "instance_id", "pool"}),
    "pdserve:request_migrations_total": ("counter", {M, "cause"}),
    "pdserve:request_migration_failures_total": ("counter", {M, "reason"}),
    "pdserve:request_migration_gap_seconds": ("histogram", {M}),
    "pdserve:drain_duration_seconds": ("gauge", {M}),
}
METRICS_BY_ROLE = {"router": ROUTER_METRICS, "prefill": PREFILL_METRICS, "decode": DECODE_METRICS,
                   "cluster": CLUSTER_METRICS}
ALL_METRICS = ROUTER_METRICS | PREFILL_METRICS | DECODE_METRICS | CLUSTER_METRICS
# Histograms that count things rather than time them.
UNITLESS_HISTOGRAMS = {"pdserve:iteration_tokens_total", "pdserve:decode_batch_size",
                       "pdserve:kv_transfer_bandwidth_bytes_per_second"}

# vLLM's buckets (the conventions): ours must contain every one of them, so that a vLLM
# dashboard's `le` selectors work unchanged.
VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5,
                     7.5, 10, 20, 40, 80, 160, 640, 2560]
VLLM_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5,
                    10, 20, 40, 80]
VLLM_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def exported(registry) -> dict[str, tuple[str, set[str]]]:
    """What a scrape of `registry` shows: series name -> (type, label names)."""
    found = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = set().union(*(set(s.labels) for s in family.samples)) - {"le"}
        found[name] = (family.type, labels)
    return found


def cluster_registry() -> CollectorRegistry:
    """What a disaggregated cluster adds to the router's /metrics, over a 1P+2D supervisor."""
    prefill_specs, decode_specs = worker_specs(cluster_config(1, 2), "127.0.0.1")
    supervisor = Supervisor([Worker(spec, actor=None) for spec in prefill_specs + decode_specs],
                            on_dead=lambda worker, reason: None)
    registry = CollectorRegistry()
    registry.register(ClusterMetrics("m").registry)
    registry.register(InstanceStatusCollector(supervisor, "m"))
    return registry


def role_registries():
    return {"router": RouterMetrics("m").registry, "prefill": PrefillMetrics("m").registry,
            "decode": DecodeMetrics("m").registry, "cluster": cluster_registry()}


# ---- names, labels, conventions ---------------------------------------------------------------
@pytest.mark.parametrize("role", sorted(METRICS_BY_ROLE))
def test_every_component_exports_exactly_the_listed_metrics(role):
    assert exported(role_registries()[role]) == METRICS_BY_ROLE[role]


def test_names_follow_the_conventions():
    for name, (kind, labels) in ALL_METRICS.items():
        assert name.startswith("pdserve:") and M in labels, name
        assert not labels & {"request_id", "prompt", "seed"}, f"{name}: per-request label"
        assert (kind == "counter") == name.endswith("_total") or name in UNITLESS_HISTOGRAMS, name
        if kind == "histogram" and name not in UNITLESS_HISTOGRAMS:
            assert name.endswith("_seconds"), f"{name}: a time in base units"


def test_every_series_exists_before_its_first_event():
    """Pre-created children: rate() sees the first increment instead of a new series."""
    for registry in role_registries().values():
        for family in registry.collect():
            assert family.samples, family.name


def test_buckets_contain_vllms():
    assert list(TTFT_BUCKETS_S) == VLLM_TTFT_BUCKETS
    assert set(VLLM_ITL_BUCKETS) <= set(ITL_BUCKETS_S) and min(ITL_BUCKETS_S) == 0.001
    assert set(VLLM_REQUEST_LATENCY_BUCKETS) <= set(REQUEST_LATENCY_BUCKETS_S)
    for buckets in (TTFT_BUCKETS_S, ITL_BUCKETS_S, REQUEST_LATENCY_BUCKETS_S):
        assert list(buckets) == sorted(set(buckets))


def test_two_routers_in_one_process_do_not_collide():
    first, second = RouterMetrics("a"), RouterMetrics("b")
    first.ttft.observe(0.5)
    assert second.registry.get_sample_value("pdserve:time_to_first_token_seconds_count",
                                            {M: "b"}) == 0


# ---- the router's metrics over a real backend -------------------------------------------------
@pytest.fixture(scope="module")
def colocated(default_loaded):
    harness = ServerHarness(ColocatedBackend(build_engine(default_loaded, num_blocks=128), 8),
                            metrics_port=0)
    yield harness
    harness.close()


def sample(harness, name: str, **labels) -> float:
    metrics = harness.server.metrics
    value = metrics.registry.get_sample_value(name, {M: harness.backend.model_info().model_name,
                                                     **labels})
    assert value is not None, (name, labels)
    return value


@pytest.mark.timeout(120)
def test_router_metrics_follow_each_call(colocated):
    client = colocated.client

    async def load():
        ok = await asyncio.gather(*(client.generate(f"Count to {n}.", max_tokens=5, ignore_eos=True,
                                                    temperature=0.0) for n in range(3)))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await client.generate("x", max_tokens=0)
        call = client.generate_stream("Tell me a story.", max_tokens=500, ignore_eos=True)
        async for _ in call:
            call.cancel()
            break
        return ok, invalid.value.code()

    completions, invalid_code = colocated.run(load())
    assert invalid_code == grpc.StatusCode.INVALID_ARGUMENT
    colocated.wait_until_idle()
    for code, num_calls in (("OK", 3), ("INVALID_ARGUMENT", 1), ("CANCELLED", 1)):
        assert sample(colocated, "pdserve:router_requests_total", transport="grpc",
                      code=code) == num_calls
    for error_type in ("invalid_request", "cancelled"):
        assert sample(colocated, "pdserve:router_request_errors_total", transport="grpc",
                      error_type=error_type) == 1
    assert sample(colocated, "pdserve:request_success_total", finished_reason="length") == 3
    assert sample(colocated, "pdserve:router_num_requests_in_flight") == 0
    assert sample(colocated, "pdserve:router_num_requests_waiting") == 0
    # The cancelled call got its first token too; TTFT as the router saw it <= the client's.
    assert sample(colocated, "pdserve:time_to_first_token_seconds_count") == 4
    assert sample(colocated, "pdserve:e2e_request_latency_seconds_count") == 3
    e2e_sum = sample(colocated, "pdserve:e2e_request_latency_seconds_sum")
    assert 0 < e2e_sum <= sum(c.timing.e2e_s for c in completions) + 0.05
    assert sample(colocated, "pdserve:inter_token_latency_seconds_count") >= 3 * 4
    assert sample(colocated, "pdserve:request_time_per_output_token_seconds_count") == 3
    assert sample(colocated, "pdserve:generation_tokens_total") >= 3 * 5 + 1
    assert sample(colocated, "pdserve:prompt_tokens_total") == (
        sum(c.usage.prompt_tokens for c in completions)
        + len(colocated.backend.tokenizer.encode("Tell me a story.")))
    for phase, count in (("queue", 3), ("prefill", 3), ("first_decode_token", 3),
                         ("kv_transfer", 0)):  # colocated: no KV moves
        assert sample(colocated, "pdserve:request_phase_seconds_count", phase=phase) == count


def test_router_serves_its_registry_over_http(colocated):
    """In the classic text format even when OpenMetrics is preferred, as Prometheus does: the
    OpenMetrics output of prometheus_client 0.26 would rename `pdserve:x` to `pdserve_x`."""
    url = f"http://{colocated.server.metrics_endpoint.address}/metrics"
    accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    assert "pdserve:time_to_first_token_seconds_count{" in text and "pdserve_" not in text
    families = set(re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M))
    assert families == {(name, kind) for name, (kind, _) in ROUTER_METRICS.items()}
    assert "_created" not in text


# ---- workers' ports and the file_sd file ------------------------------------------------------
def test_worker_metrics_ports_follow_the_base():
    config = cluster_config(2, 1)
    prefill, decode = worker_specs(config, "127.0.0.1")
    assert [s.metrics_port for s in prefill + decode] == [0, 0, 0]
    config = replace(config, server=replace(config.server, worker_metrics_port_base=9100))
    prefill, decode = worker_specs(config, "127.0.0.1")
    assert [s.metrics_port for s in prefill + decode] == [9100, 9101, 9102]


def test_targets_file_is_replaced_atomically_and_only_on_change(tmp_path):
    path = tmp_path / "sd" / "targets.json"
    targets_file = PrometheusTargetsFile(path)
    targets = [MetricsTarget("prefill", "prefill-0", "127.0.0.1:9101"),
               MetricsTarget("router", "router-0", "127.0.0.1:8000")]
    assert targets_file.write(targets)
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:9101"], "labels": {"role": "prefill", "instance": "prefill-0"}},
        {"targets": ["127.0.0.1:8000"], "labels": {"role": "router", "instance": "router-0"}}]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    inode = path.stat().st_ino
    assert not targets_file.write(list(reversed(targets)))  # same set: untouched
    targets_file.clear()
    assert json.loads(path.read_text()) == [] and path.stat().st_ino != inode  # renamed over
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]  # no temporary left


# ---- the dashboard ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_importable_by_grafana(dashboard):
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"] and dashboard["id"] is None
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["x"] + pos["w"] <= 24 and pos["h"] >= 1, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DS_PROMETHEUS, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["datasource"] == DS_PROMETHEUS and t["expr"] for t in panel["targets"])


def test_dashboard_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("model_name", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DS_PROMETHEUS
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert f", {name})" in variables[name]["definition"]
    used = {v for _, expr in dashboard_exprs(dashboard) for v in re.findall(r"\$(\w+)", expr)}
    assert used <= set(variables) | {"__rate_interval"}
    assert {"model_name", "instance"} <= used


def test_dashboard_queries_name_only_exported_metrics(dashboard):
    for title, expr in dashboard_exprs(dashboard):
        assert 'model_name=~"$model_name"' in expr, title
        for series in re.findall(r"pdserve:\w+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", series)
            known = series in ALL_METRICS or ALL_METRICS.get(base, ("",))[0] == "histogram"
            assert known, f"{title}: unknown series {series}"
            if series.endswith("_bucket"):
                assert "histogram_quantile" in expr and "by (le" in expr, title


def test_dashboard_has_the_panels_operators_ask_for(dashboard):
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    required = ["Time to first token", "Time per output token (TPOT)", "Inter-token latency",
                "End-to-end request latency", "Request throughput", "Token throughput",
                "Queue depth per pool", "KV cache usage per decode instance",
                "KV transfer bandwidth", "KV transfer latency",
                "KV transfer failures and transfers in flight", "Errors by gRPC status code",
                "Finish reasons", "Instances by lifecycle status",
                "Instance restarts and request migrations", "Migration gap and drain duration"]
    assert set(required) <= set(panels)
    for title in required[:3]:
        legends = {t["legendFormat"] for t in panels[title]["targets"]}
        assert {"p50", "p90", "p99"} <= legends, title
    phases = next(p for t, p in panels.items() if t.startswith("Request phases"))
    assert "by (le, phase)" in phases["targets"][0]["expr"]


# ---- deploy files -----------------------------------------------------------------------------
def test_prometheus_config_scrapes_the_default_targets_file():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [ServerConfig().prometheus_sd_file]


def test_compose_mounts_what_exists_and_provisioning_agrees():
    compose = yaml.safe_load((DEPLOY / "docker-compose.metrics.yml").read_text())
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana"}
    mounts = {}
    for service in services.values():
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
            mounts[target] = source
    sd_dir = str(Path(ServerConfig().prometheus_sd_file).parent)
    assert mounts[sd_dir] == sd_dir
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/pdserve.yml").read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    listen = next(a for a in services["prometheus"]["command"] if a.startswith("--web.listen"))
    assert datasource["url"].endswith(listen.rsplit(":", 1)[1])
