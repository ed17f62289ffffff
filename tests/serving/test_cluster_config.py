"""cluster/config.py: defaults, YAML parsing, error messages that name the key, CLI overrides."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

from cluster.config import (
    ClusterConfig,
    PoolConfig,
    ServerConfig,
    TransferConfig,
    cluster_config_from_dict,
    load_cluster_config,
    with_overrides,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_one_cpu_prefill_and_one_cpu_decode_instance():
    config = ClusterConfig()
    assert (config.prefill.role, config.decode.role) == ("prefill", "decode")
    assert config.prefill.num_instances == config.decode.num_instances == 1
    assert config.prefill.device == config.decode.device == "cpu"
    assert (config.model, config.device, config.dtype) == ("default", "auto", "auto")
    assert config.block_size == 16
    assert config.server == ServerConfig()
    assert (config.server.grpc_host, config.server.grpc_port) == ("127.0.0.1", 50051)
    assert (config.server.metrics_bind_host, config.server.metrics_port) == ("127.0.0.1", 8000)
    assert config.transfer == TransferConfig()
    assert (config.transfer.timeout_s, config.transfer.backend) == (30.0, "auto")
    assert (config.placement_timeout_s, config.ray_address) == (60.0, "local")  # a private Ray
    assert config.name == "pdserve"


def test_empty_mapping_gives_the_defaults():
    assert cluster_config_from_dict({}) == ClusterConfig()


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_cluster_config(path) == ClusterConfig()


def test_deploy_config_loads_as_written():
    config = load_cluster_config(REPO_ROOT / "deploy" / "pdserve.yaml")
    assert (config.device, config.dtype) == ("cuda", "bfloat16")
    for pool in config.pools:
        assert (pool.num_instances, pool.gpus_per_instance, pool.device) == (1, 1, "cuda")
    assert config.server.grpc_port == 50051
    assert config.decode.async_scheduling is True and config.prefill.async_scheduling is None
    assert (config.ray_address, config.name) == ("auto", "pdserve")  # the Ray `ray up` started


def test_yaml_sections_fill_their_dataclasses(tmp_path):
    path = tmp_path / "pdserve.yaml"
    path.write_text(
        "model: tiny\n"
        "block_size: 32\n"
        "prefill: {num_instances: 2, cpus_per_instance: 2.5, num_kv_blocks: 128}\n"
        "decode: {num_instances: 0}\n"
        "server: {grpc_port: 0, max_queued_requests: 8}\n"
        "transfer: {backend: gloo, timeout_s: 5}\n"
    )
    assert load_cluster_config(path) == ClusterConfig(
        model="tiny",
        block_size=32,
        prefill=PoolConfig("prefill", num_instances=2, cpus_per_instance=2.5, num_kv_blocks=128),
        decode=PoolConfig("decode", num_instances=0),
        server=ServerConfig(grpc_port=0, max_queued_requests=8),
        transfer=TransferConfig(backend="gloo", timeout_s=5),
    )


def test_yaml_round_trip_of_the_deploy_config(tmp_path):
    config = load_cluster_config(REPO_ROOT / "deploy" / "pdserve.yaml")
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(asdict(config)))
    assert load_cluster_config(path) == config


def test_section_with_no_keys_takes_defaults():
    assert cluster_config_from_dict({"server": None, "decode": None}) == ClusterConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"decode": {"num_instanes": 2}},
         "decode.num_instanes: unknown key; did you mean num_instances?"),
        ({"prefil": {}}, "prefil: unknown key; did you mean prefill?"),
        ({"server": {"grcp_port": 1}}, "server.grcp_port: unknown key; did you mean grpc_port?"),
        ({"transfer": {"zzz": 1}}, "transfer.zzz: unknown key; known keys: timeout_s"),
    ],
)
def test_unknown_key_names_its_path_and_the_closest_key(data, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        cluster_config_from_dict(data)


def test_file_errors_start_with_the_file_name(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("decode:\n  num_instanes: 2\n")
    with pytest.raises(ValueError, match=r"typo\.yaml: decode\.num_instanes: unknown key"):
        load_cluster_config(path)


def test_invalid_yaml_is_a_value_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("decode: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_cluster_config(path)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"prefill": {"num_instances": 0}}, "prefill.num_instances must be >= 1"),
        ({"decode": {"num_instances": -1}}, "decode.num_instances must be >= 0"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"decode": {"gpu_memory_utilization": 1.5}}, "decode.gpu_memory_utilization"),
        ({"decode": {"max_num_seqs": 64, "max_num_batched_tokens": 32}},
         "decode.max_num_batched_tokens must be >= max_num_seqs"),
        ({"prefill": {"cpus_per_instance": 0}}, "prefill.cpus_per_instance must be > 0"),
        ({"prefill": {"num_kv_blocks": 0}}, "prefill.num_kv_blocks must be >= 1"),
        ({"server": {"grpc_port": 70000}}, "server.grpc_port must be a port"),
        ({"server": {"max_queued_requests": 0}}, "server.max_queued_requests must be >= 1"),
        ({"server": {"tls_cert_file": "c.pem"}}, "server.tls_cert_file and server.tls_key_file"),
        ({"server": {"tls_client_ca_file": "ca.pem"}}, "server.tls_client_ca_file"),
        ({"transfer": {"backend": "mpi"}}, "transfer.backend must be one of"),
        ({"transfer": {"timeout_s": 0}}, "transfer.timeout_s must be > 0"),
        ({"placement_timeout_s": -1}, "placement_timeout_s must be > 0"),
        ({"ray_address": ""}, 'ray_address must not be empty; use "local"'),
        ({"name": ""}, "name must be 1-40 characters"),
        ({"name": "a" * 41}, "name must be 1-40 characters"),
        ({"name": "team/a"}, "name must be .* got 'team/a'"),
        ({"name": "-a"}, "starting with a letter or digit"),
        ({"prefill": {"role": "decode"}}, "prefill.role is set by the section name"),
        ({"decode": {"max_waiting_requests": -1}}, "decode.max_waiting_requests must be >= 0"),
        ({"prefill": {"max_waiting_requests": 8}},
         "prefill.max_waiting_requests must be 0 .*set decode.max_waiting_requests"),
    ],
)
def test_bad_value_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        cluster_config_from_dict(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"server": {"grpc_port": "50051"}}, "server.grpc_port must be an integer"),
        ({"decode": {"num_instances": 1.5}}, "decode.num_instances must be an integer"),
        ({"prefill": {"num_kv_blocks": True}}, "prefill.num_kv_blocks must be an integer or null"),
        ({"transfer": {"timeout_s": "30s"}}, "transfer.timeout_s must be a number"),
        ({"model": 7}, "model must be a string"),
        ({"decode": [1, 2]}, "decode must be a mapping"),
        ({"decode": {"async_scheduling": "yes"}}, "decode.async_scheduling must be true or false or null"),
        ({"decode": {"max_waiting_requests": 1.5}}, "decode.max_waiting_requests must be an integer"),
    ],
)
def test_wrong_type_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        cluster_config_from_dict(data)


def test_top_level_must_be_a_mapping():
    with pytest.raises(ValueError, match="the cluster config must be a mapping"):
        cluster_config_from_dict(["model"])  # type: ignore[arg-type]


def test_parallel_pools_and_their_limits():
    pool = PoolConfig("decode", gpus_per_instance=4, tensor_parallel_size=2,
                      pipeline_parallel_size=2)
    assert (pool.tensor_parallel_size, pool.pipeline_parallel_size) == (2, 2)
    assert PoolConfig("prefill", tensor_parallel_size=3).device == "cpu"  # Gloo ranks
    assert PoolConfig("prefill", tensor_parallel_size=4, expert_parallel_size=4)
    with pytest.raises(ValueError, match=r"prefill.expert_parallel_size must be 1 or "
                                         r"tensor_parallel_size \(2\).*got 4"):
        PoolConfig("prefill", tensor_parallel_size=2, expert_parallel_size=4)
    with pytest.raises(ValueError, match="decode.collective_timeout_s must be > 0"):
        PoolConfig("decode", collective_timeout_s=0)


def test_device_cuda_override_gives_each_rank_a_gpu():
    config = cluster_config_from_dict({"device": "cpu", "prefill": {"tensor_parallel_size": 2},
                                       "decode": {"tensor_parallel_size": 2}})
    on_gpu = with_overrides(config, device="cuda")
    assert [p.gpus_per_instance for p in on_gpu.pools] == [2, 2]


def test_gpus_must_match_the_ranks():
    with pytest.raises(ValueError, match=r"prefill.gpus_per_instance must equal .*= 1\), got 2"):
        PoolConfig("prefill", gpus_per_instance=2)


def test_device_must_agree_with_the_pools():
    with pytest.raises(ValueError, match="prefill.gpus_per_instance must be >= 1 when device is"):
        ClusterConfig(device="cuda")
    gpu_pool = PoolConfig("decode", gpus_per_instance=1)
    with pytest.raises(ValueError, match="decode.gpus_per_instance must be 0 when device is cpu"):
        ClusterConfig(device="cpu", decode=gpu_pool)
    mixed = ClusterConfig(device="auto", decode=gpu_pool)
    assert (mixed.prefill.device, mixed.decode.device) == ("cpu", "cuda")


def test_nccl_transfer_needs_gpus_in_both_pools():
    with pytest.raises(ValueError, match="transfer.backend nccl needs GPU instances"):
        ClusterConfig(transfer=TransferConfig(backend="nccl"))


def test_pools_must_sit_in_their_own_section():
    with pytest.raises(ValueError, match="prefill.role must be 'prefill'"):
        ClusterConfig(prefill=PoolConfig("decode"))


def test_overrides_replace_the_named_fields():
    config = with_overrides(
        ClusterConfig(), model="tiny", prefill_instances=2, decode_instances=3, grpc_port=6000
    )
    assert config.model == "tiny"
    assert (config.prefill.num_instances, config.decode.num_instances) == (2, 3)
    assert config.server.grpc_port == 6000
    assert config.server.metrics_port == 8000  # untouched


def test_host_override_moves_grpc_and_metrics_unless_metrics_host_is_set():
    config = with_overrides(ClusterConfig(), grpc_host="0.0.0.0")
    assert (config.server.grpc_host, config.server.metrics_bind_host) == ("0.0.0.0", "0.0.0.0")
    pinned = ClusterConfig(server=ServerConfig(metrics_host="10.0.0.5"))
    assert with_overrides(pinned, grpc_host="0.0.0.0").server.metrics_bind_host == "10.0.0.5"


def test_ray_address_and_name_overrides():
    config = with_overrides(ClusterConfig(), ray_address="10.0.0.1:6379", name="team-a_2")
    assert (config.ray_address, config.name) == ("10.0.0.1:6379", "team-a_2")
    assert cluster_config_from_dict({"name": "B", "ray_address": "auto"}).name == "B"


def test_ray_address_precedence_flag_then_environment_then_config():
    from cluster.ray_runtime import resolve_ray_address

    assert resolve_ray_address(None, "local", {}) == "local"
    assert resolve_ray_address(None, "local", {"RAY_ADDRESS": ""}) == "local"
    assert resolve_ray_address(None, "local", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert resolve_ray_address("auto", "local", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"


def test_overrides_that_were_not_given_change_nothing():
    config = ClusterConfig(model="tiny")
    assert with_overrides(config, model=None, device=None, grpc_port=None) == config


def test_device_override_fixes_the_gpu_counts():
    on_gpu = with_overrides(ClusterConfig(), device="cuda")
    assert on_gpu.device == "cuda"
    assert on_gpu.prefill.gpus_per_instance == on_gpu.decode.gpus_per_instance == 1
    back_on_cpu = with_overrides(on_gpu, device="cpu")
    assert back_on_cpu.prefill.gpus_per_instance == back_on_cpu.decode.gpus_per_instance == 0
    assert back_on_cpu == replace(ClusterConfig(), device="cpu")


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="decode.num_instances must be >= 0"):
        with_overrides(ClusterConfig(), decode_instances=-1)
    with pytest.raises(ValueError, match="device must be one of"):
        with_overrides(ClusterConfig(), device="tpu")
    with pytest.raises(ValueError, match="unknown override 'prefill_gpus'"):
        with_overrides(ClusterConfig(), prefill_gpus=1)


def test_configs_are_immutable():
    config = ClusterConfig()
    with pytest.raises(AttributeError):
        config.block_size = 32  # type: ignore[misc]


def test_async_scheduling_reaches_the_decode_engines():
    from cluster.pools import worker_specs

    cfg = cluster_config_from_dict({"decode": {"async_scheduling": True}})
    prefill, decode = worker_specs(cfg, "127.0.0.1")
    assert decode[0].engine.use_async_scheduling  # asked for, even on CPU
    assert not prefill[0].engine.use_async_scheduling  # the CPU default
    # prefill instances capture graphs too: short prompts replay them as rows
    assert decode[0].engine.use_cuda_graphs and prefill[0].engine.use_cuda_graphs
    assert prefill[0].engine.graph_prefill_max_context > 0


def test_the_decode_queue_bound_reaches_the_decode_specs():
    from cluster.pools import worker_specs

    cfg = cluster_config_from_dict({"decode": {"num_instances": 2, "max_waiting_requests": 7}})
    prefill, decode = worker_specs(cfg, "127.0.0.1")
    assert [spec.max_waiting_requests for spec in decode] == [7, 7]
    assert prefill[0].max_waiting_requests == 0  # prefill has no decode queue
    default_decode = worker_specs(ClusterConfig(), "127.0.0.1")[1]
    assert default_decode[0].max_waiting_requests == 0  # the worker's 4 x max_num_seqs


def test_a_worker_spec_refuses_a_negative_queue_bound():
    from cluster.pools import worker_specs
    from cluster.worker_spec import WorkerSpec

    engine = worker_specs(ClusterConfig(), "127.0.0.1")[1][0].engine
    with pytest.raises(ValueError, match="max_waiting_requests must be >= 0"):
        WorkerSpec("decode-0", "decode", engine, max_waiting_requests=-1)
