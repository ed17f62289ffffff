"""SamplingParams: defaults, normalization and the messages a user sees for bad values."""

from __future__ import annotations

from dataclasses import fields

import pytest

from engine.sampling_params import FLOAT_FIELDS, SamplingParams


def test_defaults_follow_vllm() -> None:
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.min_p == 0.0 and params.repetition_penalty == 1.0
    assert params.seed is None and params.stop == () and params.stop_token_ids == ()
    assert not params.ignore_eos and not params.logprobs
    assert not params.is_greedy


def test_lists_become_tuples() -> None:
    params = SamplingParams(stop=["\n\n", "END"], stop_token_ids=[2, 7])
    assert params.stop == ("\n\n", "END")
    assert params.stop_token_ids == (2, 7)
    assert hash(params.stop) == hash(("\n\n", "END"))


def test_is_greedy_at_zero_temperature() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
        ({"max_tokens": 2.5}, "max_tokens must be an int >= 1, got 2.5"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": "0.5"}, "temperature must be a finite number, got '0.5'"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k must be an int >= -1 (0 or -1 = off), got -2"),
        ({"min_p": 1.2}, "min_p must be in [0, 1], got 1.2"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
        ({"seed": -1}, "seed must be an int in [0, 2**63), got -1"),
        ({"seed": 2**63}, f"seed must be an int in [0, 2**63), got {2**63}"),
        ({"stop": ("ok", "")}, "stop strings must be non-empty str, got ''"),
        ({"stop": "END"}, "stop must be a list or tuple, got str"),
        ({"stop_token_ids": (3, -1)}, "stop_token_ids must be ints >= 0, got -1"),
    ],
)
def test_invalid_values_name_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_rejected_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be a finite number, got {value!r}$"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_top_k_off_values_and_positive_are_valid(top_k: int) -> None:
    assert SamplingParams(top_k=top_k).top_k == top_k


def test_extreme_valid_values() -> None:
    params = SamplingParams(top_p=1.0, min_p=1.0, seed=2**63 - 1, repetition_penalty=0.5)
    assert params.seed == 2**63 - 1


def test_every_float_field_is_checked_for_finiteness() -> None:
    float_fields = {f.name for f in fields(SamplingParams) if f.type == "float"}
    assert float_fields == set(FLOAT_FIELDS)
