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


def check_expert_parallel_fits(pool: Any, model_config: Any) -> None:
    """A pool's expert_parallel_size suits the model (a MoE model whose experts divide by it),
    refused naming the pool's key before any instance is placed."""
    from engine.parallel import check_expert_parallel

    try:
        check_expert_parallel(model_config, pool.tensor_parallel_size, pool.expert_parallel_size)
    except ValueError as exc:
        raise ValueError(f"{pool.role}.expert_parallel_size / tensor_parallel_size: {exc}") from None


def check_layouts_map(prefill: Any, decode: Any, model_config: Any) -> None:
    """KV moves from prefill ranks to decode ranks by the transfer plan of the two pools'
    layouts (kv_transfer/planner.py: re-sharded by layer range and KV-head range), so the pools
    may differ; each must be able to hold the model (`model_config`: its layers and KV heads),
    else the startup is refused naming the pool's keys (before any instance is placed)."""
    from kv_transfer.planner import ModelShape, ParallelLayout, layout_problems, plan_transfer

    model = ModelShape(model_config.num_layers, model_config.num_kv_heads)
    layouts = []
    for pool in (prefill, decode):
        layout = ParallelLayout(pool.tensor_parallel_size, pool.pipeline_parallel_size)
        for problem in layout_problems(layout, model, pool.role):
            raise ValueError(
                f"{pool.role}.tensor_parallel_size / {pool.role}.pipeline_parallel_size cannot "
                f"split the model ({model.num_kv_heads} KV heads, {model.num_layers} layers), "
                f"so no KV transfer plan maps the pools: {problem}")
        layouts.append(layout)
    plan_transfer(*layouts, model)  # both layouts hold the model: a plan always exists
