"""A load tool we did not write, NVIDIA's `aiperf`, runs a short bounded profile against the
OpenAI-compatible API of a 1 prefill + 1 decode CPU cluster; its report's request and token
counts equal what the router's metrics recorded for those HTTP calls.

aiperf is not a dependency of pdserve (it brings its own stack), so it lives in a virtualenv of
its own and this test runs only when told where (not in `make test`):

    python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf
    PDSERVE_AIPERF=/tmp/aiperf/bin/aiperf .venv/bin/python -m pytest -m slow \\
        tests/serving/test_openai_aiperf.py

aiperf needs a Hugging Face tokenizer to build its prompts: the served model's, saved to a
folder (a folder path works unless HF_HUB_OFFLINE is set: offline, aiperf 0.13 looks only in the
HF cache). Token counts are the server's (`--use-server-token-count`: the streams' usage).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.serving.test_openai_api import cluster  # noqa: F401 (the module's own 1P+1D cluster)

AIPERF = os.environ.get("PDSERVE_AIPERF", "")
NUM_REQUESTS = 12
INPUT_TOKENS = 32
OUTPUT_TOKENS = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(not (AIPERF and Path(AIPERF).is_file()),
                       reason="set PDSERVE_AIPERF to an aiperf executable (see the docstring)"),
]


def router_count(cluster, name: str, **labels: str) -> float:
    value = cluster.server.metrics.registry.get_sample_value(
        f"pdserve:{name}", {"model_name": cluster.backend.model_info().model_name, **labels})
    return value or 0.0


def counts(cluster) -> tuple[float, float, float]:
    return (router_count(cluster, "router_requests_total", transport="http", code="OK"),
            router_count(cluster, "prompt_tokens_total"),
            router_count(cluster, "generation_tokens_total"))


def test_aiperf_counts_equal_the_router_metrics(cluster, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    cluster.backend.tokenizer.hf_tokenizer.save_pretrained(tokenizer_dir)
    artifacts = tmp_path / "aiperf"
    before = counts(cluster)
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    run = subprocess.run([
        AIPERF, "profile", "--model", cluster.backend.model_info().model_name,
        "--url", cluster.server.http.url, "--endpoint-type", "completions", "--streaming",
        "--tokenizer", str(tokenizer_dir), "--request-count", str(NUM_REQUESTS),
        "--concurrency", "4", "--prompt-input-tokens-mean", str(INPUT_TOKENS),
        "--prompt-input-tokens-stddev", "0", "--output-tokens-mean", str(OUTPUT_TOKENS),
        "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true",
        "--use-server-token-count", "--no-server-metrics", "--no-gpu-telemetry",
        "--ui-type", "none", "--random-seed", "1", "--artifact-dir", str(artifacts)],
        capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    num_ok, num_prompt, num_generated = (after - b for after, b in zip(counts(cluster), before))
    assert report["request_count"]["avg"] == NUM_REQUESTS == num_ok
    assert report["total_isl"]["avg"] == num_prompt
    assert report["total_osl"]["avg"] == num_generated == NUM_REQUESTS * OUTPUT_TOKENS
    assert report["time_to_first_token"]["avg"] > 0
    cluster.wait_until_idle()
