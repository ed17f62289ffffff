"""`pdserve generate` checks what the user typed before torch and the model load."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import engine.llm_engine
from pdserve.cli import build_parser, main
from pdserve.cli_generate import validated_inputs
from tests.helpers import build_engine

BAD_INPUTS = [
    (["--prompt", ""], "prompt is empty: --prompt 1 of 1 has no text"),
    (["--prompt", "ok", "--prompt", ""], "prompt is empty: --prompt 2 of 2 has no text"),
    (["--temperature", "inf"], "temperature must be a finite number, got inf"),
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--top-p", "nan"], "top_p must be a finite number, got nan"),
    (["--max-tokens", "0"], "max_tokens must be an int >= 1, got 0"),
    (["--top-k", "-5"], "top_k must be an int >= -1"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be >= 1, got 0"),
    (["--pipeline-parallel-size", "-1"], "--pipeline-parallel-size must be >= 1, got -1"),
    (["--expert-parallel-size", "0"], "--expert-parallel-size must be >= 1, got 0"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_fails_before_the_engine_is_built(monkeypatch, capsys, args, message):
    def never(*args, **kwargs):
        raise AssertionError("the engine was built before the inputs were checked")

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", never)
    assert main(["generate", *args]) == 1
    assert capsys.readouterr().err.startswith(f"pdserve: error: {message}")


def test_bad_input_exits_before_torch_is_imported():
    code = ("import sys; from pdserve.cli import main; rc = main(['generate', '--prompt', '']); "
            "print('torch' in sys.modules); sys.exit(rc)")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed_s = time.monotonic() - started
    assert res.returncode == 1 and res.stdout.strip() == "False"
    assert res.stderr.strip() == "pdserve: error: prompt is empty: --prompt 1 of 1 has no text"
    assert elapsed_s < 5  # interpreter start included; without torch it is well under a second


GENERATE = ["generate", "--json", "--max-tokens", "8", "--prompt", "The capital of France is",
            "--prompt", "def fib(n):", "--prompt", "Once upon a time"]


def _generate_json(*flags: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pdserve", *GENERATE, *flags],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def one_rank(default_loaded) -> str:
    """What `pdserve generate` prints for GENERATE on one rank: its own parser and sampling
    defaults, one engine over the session's copy of the default model, in this process."""
    prompts, params = validated_inputs(build_parser().parse_args(GENERATE))
    outputs = build_engine(default_loaded).generate(
        [default_loaded.tokenizer.encode(p) for p in prompts], params)
    assert len(outputs) == 3 and all(o.token_ids for o in outputs)
    return "".join(json.dumps(o.to_json_dict(), ensure_ascii=False) + "\n" for o in outputs)


def test_parallel_flags_reach_the_engine(monkeypatch):
    captured = []

    def capture(self, config):
        captured.append(config.parallel)
        raise RuntimeError("captured")

    monkeypatch.setattr(engine.llm_engine.LLMEngine, "__init__", capture)
    with pytest.raises(RuntimeError, match="captured"):
        main(["generate", "--tensor-parallel-size", "3", "--pipeline-parallel-size", "2"])
    (parallel,) = captured
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size) == (3, 2)


def test_tensor_parallel_flag_gives_the_one_rank_tokens(one_rank):
    """The default model's 9 query / 3 KV heads over 3 tensor ranks (rank processes over Gloo):
    the same greedy tokens."""
    assert _generate_json("--tensor-parallel-size", "3") == one_rank


# make test runs the one above; pipeline stages on their own and TP x PP run in
# tests/engine/test_rank_group.py on tiny models.
@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--pipeline-parallel-size", "2"),
                                   ("--tensor-parallel-size", "3", "--pipeline-parallel-size", "2")],
                         ids=["pp2", "tp3-pp2"])
def test_parallel_flags_give_the_one_rank_tokens(one_rank, flags):
    """The default model (30 layers) over 2 pipeline stages, and over 3 tensor ranks x 2 stages:
    six rank processes over Gloo, the same greedy tokens."""
    assert _generate_json(*flags) == one_rank
