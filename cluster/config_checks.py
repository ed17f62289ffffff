"""Field checks shared by the cluster config's sections (cluster/config.py): each raises a
ValueError that names the key by its path, so the message points at the line to fix."""

from __future__ import annotations

import functools
import typing
from dataclasses import fields
from typing import Any


def join_path(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def check_types(config: Any, section: str) -> None:
    """Raise ValueError naming the first field whose value is not of its annotated type."""
    for name, hint in _type_hints(type(config)).items():
        value = getattr(config, name)
        if not _has_type(value, hint):
            raise ValueError(f"{join_path(section, name)} must be {_describe(hint)}, got {value!r}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _has_type(value: Any, hint: Any) -> bool:
    options = typing.get_args(hint)
    if options:  # `X | None`
        return any(_has_type(value, option) for option in options)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):  # YAML true is not the integer 1
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    options = typing.get_args(hint)
    if options:
        return " or ".join(_describe(option) for option in options)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)} section")


def at_least(path: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"{path} must be >= {minimum}, got {value}")


def positive(path: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{path} must be > 0, got {value}")


def check_port(path: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{path} must be a port in 0..65535 (0 = any free port), got {value}")


def one_of(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{path} must be one of {', '.join(allowed)}, got {value!r}")


def check_parallelism(pool: Any, section: str) -> None:
    """A pool's parallel sizes: each >= 1, expert parallelism 1 or the tensor parallel size (it
    splits a MoE model's experts over the tensor ranks, adding no rank), and a GPU instance owns
    one GPU per rank (tensor x pipeline)."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
        at_least(join_path(section, name), getattr(pool, name), 1)
    if pool.expert_parallel_size not in (1, pool.tensor_parallel_size):
        raise ValueError(
            f"{join_path(section, 'expert_parallel_size')} must be 1 or tensor_parallel_size "
            f"({pool.tensor_parallel_size}): experts split over the instance's tensor-parallel "
            f"ranks, whose attention stays tensor parallel; got {pool.expert_parallel_size}")
    ranks = pool.tensor_parallel_size * pool.pipeline_parallel_size
    if pool.gpus_per_instance > 0 and pool.gpus_per_instance != ranks:
        raise ValueError(
            f"{join_path(section, 'gpus_per_instance')} must equal tensor_parallel_size * "
            f"pipeline_parallel_size ({pool.tensor_parallel_size} * "
            f"{pool.pipeline_parallel_size} = {ranks}), got {pool.gpus_per_instance}"
        )


def check_same_layout(prefill: Any, decode: Any) -> None:
    """KV moves rank i -> rank i, so both pools need the same tensor x pipeline layout (a
    re-sharding transfer between different layouts is not built yet)."""
    def layout(pool: Any) -> str:
        return f"tp={pool.tensor_parallel_size} pp={pool.pipeline_parallel_size}"
    if layout(prefill) != layout(decode):
        raise ValueError(
            f"prefill and decode pools must have the same parallel layout for now (KV moves "
            f"from each prefill rank to the same decode rank): prefill is {layout(prefill)}, "
            f"decode is {layout(decode)}; set the same tensor_parallel_size and "
            f"pipeline_parallel_size in both sections")
