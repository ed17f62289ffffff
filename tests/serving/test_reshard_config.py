"""Pools of different parallel layouts: the cluster config accepts them (the KV is re-sharded
on the way, kv_transfer/planner.py); a layout that cannot split the model's KV heads or layers
is refused at startup, naming the pool's keys, before any instance is placed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.config import cluster_config_from_dict
from cluster.config_checks import check_layouts_map
from cluster.pools import start_cluster
from tests.engine.factories import save_tiny_hf_model


def test_pools_of_different_layouts_are_accepted():
    config = cluster_config_from_dict({"device": "cpu", "prefill": {"tensor_parallel_size": 2},
                                       "decode": {"pipeline_parallel_size": 2}})
    assert [(p.tensor_parallel_size, p.pipeline_parallel_size) for p in config.pools] == \
        [(2, 1), (1, 2)]
    model = SimpleNamespace(num_layers=4, num_kv_heads=2)
    check_layouts_map(config.prefill, config.decode, model)  # TP=2 -> PP=2 maps


def test_a_layout_that_cannot_split_the_model_is_refused_naming_the_keys():
    config = cluster_config_from_dict({"device": "cpu", "decode": {"tensor_parallel_size": 3}})
    with pytest.raises(ValueError, match=r"decode.tensor_parallel_size / "
                                         r"decode.pipeline_parallel_size cannot split the model "
                                         r"\(2 KV heads, 4 layers\).*num_kv_heads \(2\) and "
                                         r"tensor parallel size 3 must divide one another"):
        check_layouts_map(config.prefill, config.decode,
                          SimpleNamespace(num_layers=4, num_kv_heads=2))
    config = cluster_config_from_dict({"device": "cpu", "prefill": {"pipeline_parallel_size": 5}})
    with pytest.raises(ValueError, match=r"prefill.tensor_parallel_size / .*pipeline parallel "
                                         r"size 5 must be between 1 and the model's 4 layers"):
        check_layouts_map(config.prefill, config.decode,
                          SimpleNamespace(num_layers=4, num_kv_heads=2))


def test_startup_refuses_an_impossible_mapping_before_placing_anything(tmp_path):
    model = save_tiny_hf_model(tmp_path / "llama", "llama")  # 2 KV heads
    config = cluster_config_from_dict({"model": str(model), "device": "cpu",
                                       "decode": {"tensor_parallel_size": 3}})
    with pytest.raises(ValueError, match="decode.tensor_parallel_size .* cannot split the model"):
        asyncio.run(start_cluster(config))  # no Ray needed: refused before any placement
