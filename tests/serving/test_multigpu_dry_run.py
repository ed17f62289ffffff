"""The multi-GPU benchmarks of issues 20 and 21 (benchmarks/multigpu_suite.sh,
multigpu4_suite.sh) dry-run on CPU: each script with `--device cpu --tiny` takes its GPU code
path end to end (tiny random models, Gloo instead of NCCL, rank processes on the CPU) and
must write a JSON whose equality checks passed. The TP=2 run is the cheap one; the others
(hand-off, expert parallel, the clusters, the suites' plumbing) are slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "benchmarks"


def _dry_run(script: str, out_dir: Path, *flags: str, timeout_s: float = 600) -> dict:
    """Run benchmarks/<script> --device cpu --tiny; exit 0 and exactly one JSON under out_dir."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--tiny",
                           "--out-dir", str(out_dir), *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out_dir.glob("*.json")
    assert path.name.endswith("_cpu-dry-run.json")
    return json.loads(path.read_text())


def _assert_timed(layouts: list[dict], batches: tuple[int, ...]) -> None:
    for row in layouts:
        assert [d["batch"] for d in row["decode"]] == list(batches)
        assert all(d["ms_per_step"] > 0 for d in row["decode"]) and row["prefill_ms"] > 0
        assert all(d["roofline_ms"] > 0 and d["fraction_of_roofline"] > 0 for d in row["decode"])


def test_tp2_matches_tp1_and_is_timed(tmp_path):
    result = _dry_run("tp_latency.py", tmp_path, "--tp", "2", "--baseline-tp", "1")
    assert result["outputs_match"] and len(result["output_checks"]) == 3
    parallel, baseline = result["layouts"][0], result["layouts"][-1]
    assert (parallel["tp"], baseline["tp"]) == (2, 1)
    _assert_timed(result["layouts"], (1, 4))
    for d in parallel["decode"]:  # rank 0 spends part, not all, of each step in its all-reduces
        assert 0 < d["collective_share"] <= 1
    assert all(d["collective_share"] is None for d in baseline["decode"])


@pytest.mark.slow
def test_expert_parallel_matches_one_rank(tmp_path):
    result = _dry_run("tp_latency.py", tmp_path, "--shape", "qwen3-30b-a3b", "--tp", "2",
                      "--ep", "--baseline-tp", "1")
    assert result["outputs_match"]
    assert result["layouts"][0]["ep"] == 2 and result["layouts"][-1]["ep"] == 1
    _assert_timed(result["layouts"], (1, 4))


@pytest.mark.slow
def test_disagg_handoff_equals_colocated(tmp_path):
    result = _dry_run("disagg_gpu.py", tmp_path)
    assert result["outputs_equal"] and result["prefill_failed_transfers"] == 0
    assert [row["tokens"] for row in result["transfer"]] == [64, 256]
    for row in result["transfer"]:
        assert row["raw_nccl_s"] > 0 and row["handoff_lpm1_s"] > 0
        assert row["pack_s"] > 0 and row["unpack_s"] > 0  # where the hand-off's time goes


@pytest.mark.slow
@pytest.mark.parametrize("layouts", ["handoff_tp2", "hetero"])
def test_cluster_layouts_equal_colocated(tmp_path, layouts):
    result = _dry_run("layout_handoff.py", tmp_path, "--layouts", layouts, timeout_s=900)
    assert result["outputs_match"]
    for row in result["rows"]:
        assert row["transfer_window_s"] > 0 and row["raw_pair_s"] > 0
        assert all(check["equal"] for check in row["output_checks"])


@pytest.mark.slow
def test_goodput_sweeps_both_setups(tmp_path):
    result = _dry_run("goodput.py", tmp_path, timeout_s=900)
    for setup in ("disaggregated_1p1d", "colocated_x2"):
        rates = result[setup]["rates"]
        assert [r["rate"] for r in rates] == [2.0, 8.0]
        assert all(r["failed_requests"] == 0 and r["p99_itl_ms"] > 0 for r in rates)
    assert min(result["colocated_x2"]["requests_per_instance"]) > 0  # both instances served
    assert all(r["server_timing_mean_ms"]["kv_transfer"] > 0
               for r in result["disaggregated_1p1d"]["rates"])


@pytest.mark.slow
@pytest.mark.parametrize("suite,part,need", [("multigpu_suite.sh", "tp", "2"),
                                             ("multigpu4_suite.sh", "ep4", "4")])
def test_suites_dry_run_a_part_and_skip_without_gpus(tmp_path, suite, part, need):
    env = dict(os.environ, OUT=str(tmp_path), DRY_RUN="1", PY=sys.executable,
               PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(BENCH / suite), part], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert f"== {part}: rc=0" in done.stdout, done.stdout[-3000:]
    assert list(tmp_path.glob("tp_latency_*_cpu-dry-run.json"))
    env.pop("DRY_RUN")  # on this machine, with no GPU: each part says it cannot run
    done = subprocess.run(["bash", str(BENCH / suite), part], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert f"== {part}: SKIPPED: needs {need} GPUs" in done.stdout, done.stdout[-3000:]


def test_a_difference_is_reported_with_the_reference_gap(tmp_path):
    """What the benchmarks record where a parallel layout's greedy tokens part from the
    baseline's: the position and the baseline's logit gap between the two picks there."""
    from benchmarks.multigpu_common import first_difference
    from engine.config import CacheConfig, EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from tests.engine.factories import save_tiny_hf_model
    from tests.helpers import next_logits

    folder = save_tiny_hf_model(tmp_path / "llama", "llama", seed=5)
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", dtype="float32",
                                    cache=CacheConfig(block_size=16, num_blocks=32)))
    prompt = [100 + 7 * i for i in range(12)]
    want = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0,
                                                    ignore_eos=True))[0].token_ids
    logits = next_logits(engine, prompt + want[:2])
    runner_up = int(logits.topk(2).indices[1])
    got = want[:2] + [runner_up, want[3]]
    assert first_difference(engine, prompt, want, want) == {"equal": True}
    report = first_difference(engine, prompt, got, want)
    assert report["first_difference"] == 2 and not report["equal"]
    assert report["logit_gap"] == pytest.approx(float(logits[want[2]] - logits[runner_up]))
    assert report["near_tie"] == (report["relative_gap"] < report["tolerance"])
