"""CI smoke test of the serving load generator (benchmarks/serving.py): a few short requests
against an in-process colocated router (`--start-colocated`, over the session's default model),
then the fields of the JSON it writes and their sanity: every request succeeded, throughputs
agree with counts and duration, latencies are positive and their percentiles ordered."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import serving

pytestmark = pytest.mark.timeout(120)  # loading the session's model can come first

NUM_PROMPTS = 8
OUTPUT_LEN = 8
METRICS = ("ttft", "tpot", "itl", "e2el")


@pytest.fixture(scope="module", params=["grpc", "openai"])
def smoke(request, default_loaded, tmp_path_factory) -> dict:
    """One run of the command line (Poisson arrivals, bounded concurrency, SLOs) per backend
    (gRPC, or the OpenAI-compatible HTTP API); the JSON it wrote. The session's model stands in
    for the one --start-colocated would load."""
    result_file = tmp_path_factory.mktemp("serving") / "result.json"
    argv = ["--start-colocated", "--backend", request.param, "--device", "cpu", "--num-prompts", str(NUM_PROMPTS),
            "--dataset", "random", "--random-input-len", "32", "--random-output-len",
            str(OUTPUT_LEN), "--random-range-ratio", "0.5", "--request-rate", "20",
            "--max-concurrency", "6", "--goodput", "ttft:60000", "tpot:60000", "--seed", "1",
            "--max-duration-s", "60", "--result-file", str(result_file)]
    assert serving.main(argv, loaded=default_loaded) == 0
    return json.loads(result_file.read_text())


def test_every_request_succeeds(smoke):
    assert smoke["successful_requests"] == NUM_PROMPTS
    assert smoke["failed_requests"] == 0 and smoke["errors"] == {}
    # --random-output-len 8 with ratio 0.5 -> 4..12 tokens each; ignore_eos makes them exact
    assert 4 * NUM_PROMPTS <= smoke["total_output_tokens"] <= 12 * NUM_PROMPTS
    assert 16 * NUM_PROMPTS <= smoke["total_input_tokens"] <= 48 * NUM_PROMPTS


def test_throughputs_follow_from_counts_and_duration(smoke):
    duration_s = smoke["duration_s"]
    assert duration_s > 0
    assert math.isclose(smoke["request_throughput"], NUM_PROMPTS / duration_s, rel_tol=1e-2)
    assert math.isclose(smoke["output_throughput"],
                        smoke["total_output_tokens"] / duration_s, rel_tol=1e-2)
    assert math.isclose(smoke["total_token_throughput"],
                        smoke["input_throughput"] + smoke["output_throughput"], rel_tol=1e-2)
    # SLOs of a minute: every request is good
    assert smoke["slo_attainment"] == 1.0
    assert math.isclose(smoke["request_goodput"], smoke["request_throughput"], rel_tol=1e-2)


@pytest.mark.parametrize("metric", METRICS)
def test_latencies_positive_and_percentiles_ordered(smoke, metric):
    mean, median, p90, p99 = (smoke[f"{stat}_{metric}_ms"]
                              for stat in ("mean", "median", "p90", "p99"))
    assert mean > 0 and median > 0
    assert median <= p90 <= p99
    assert p99 <= smoke["p99_e2el_ms"] + 1e-6  # nothing outlasts the whole request


def test_first_token_comes_before_the_end_and_server_timing_arrives(smoke):
    assert smoke["mean_ttft_ms"] < smoke["mean_e2el_ms"]
    if smoke["backend"] == "pdserve-grpc":  # the router's Timing travels over gRPC only
        assert smoke["server_timing_mean_ms"]["prefill"] > 0


def test_summary_names_the_run(smoke):
    assert smoke["address"] == "colocated" and smoke["dataset"] == "random"
    assert smoke["num_prompts"] == NUM_PROMPTS and smoke["max_concurrency"] == 6
    assert smoke["goodput_slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}


@pytest.mark.parametrize("argv", [
    ["--address", "10.0.0.1:50051"], ["--address", "localhost"], ["--num-prompts", "0"],
    ["--random-range-ratio", "1.0"], ["--goodput", "ttft"], ["--goodput", "latency:5"],
    ["--request-rate", "0"],
])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        serving.parse_args(argv)
