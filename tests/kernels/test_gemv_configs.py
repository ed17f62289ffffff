"""Per-shape GEMV tiles (engine/kernels/gemv_configs.json): the lookup picks the entry of this
GPU, prologue and weight shape, falls back to the prologue's constant otherwise, an explicit
`config=` wins, a malformed file is an error naming it, and the kernel launched with a
looked-up tile still equals the float32 torch reference (CUDA, or Triton's interpreter)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import gemv as gemv_mod
from engine.kernels.gemv import (CONFIG_PATH, DEFAULT_CONFIG, NORM_CONFIG, SILU_CONFIG,
                                 clear_cache, get_config, shape_key, write_configs)
from engine.kernels.prefill_attention_configs import device_name
from tests.kernels.helpers import assert_close

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def config_file(tmp_path):
    """A JSON with one H100 entry per prologue; caches cleared before and after."""
    path = tmp_path / "gemv_configs.json"
    path.write_text(json.dumps({"configs": {
        shape_key(H100, "rms_norm", 5120, 2048): [2, 1024, 4, 1],
        shape_key(H100, "plain", 2048, 4096): [1, 2048, 8, 1],
        shape_key(H100, "silu_mul", 2048, 768): [16, 256, 8, 3]}}))
    clear_cache()
    yield path
    clear_cache()


@pytest.fixture
def h100(monkeypatch):
    """Make the name lookup report an H100 for CUDA devices (the lookup's only GPU input)."""
    monkeypatch.setattr(gemv_mod, "device_name", lambda device: H100)


def test_lookup_picks_the_entry_of_this_gpu_prologue_and_shape(config_file, h100):
    cuda = torch.device("cuda", 0)
    assert get_config("rms_norm", 5120, 2048, cuda, config_file) == (2, 1024, 4, 1)
    assert get_config("plain", 2048, 4096, cuda, config_file) == (1, 2048, 8, 1)
    assert get_config("silu_mul", 2048, 768, cuda, config_file) == (16, 256, 8, 3)


def test_lookup_falls_back_to_the_constants(config_file, tmp_path):
    cuda = torch.device("cuda", 0)
    # another GPU: the H100 entries do not apply
    assert get_config("rms_norm", 5120, 2048, "cpu", config_file) == NORM_CONFIG
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemv_mod, "device_name", lambda device: H100)
        clear_cache()
        assert get_config("rms_norm", 5120, 2048, cuda, config_file) == (2, 1024, 4, 1)
        assert get_config("plain", 5120, 2048, cuda, config_file) == DEFAULT_CONFIG  # prologue
        assert get_config("rms_norm", 5120, 4096, cuda, config_file) == NORM_CONFIG  # shape
        assert get_config("silu_mul", 4096, 14336, cuda, config_file) == SILU_CONFIG
        # no file at all: today's constants exactly
        assert get_config("plain", 2048, 4096, cuda, tmp_path / "absent.json") == DEFAULT_CONFIG
    with pytest.raises(ValueError, match="prologue"):
        get_config("add_rms_norm", 5120, 2048, cuda, config_file)


def test_lookup_is_cached_per_shape(config_file, h100):
    get_config("plain", 2048, 4096, "cpu", config_file)
    config_file.write_text("not json")  # not read again: the hot path does no file I/O
    assert get_config("plain", 2048, 4096, "cpu", config_file) == (1, 2048, 8, 1)
    clear_cache()
    with pytest.raises(ValueError, match="malformed"):
        get_config("plain", 2048, 4096, "cpu", config_file)


@pytest.mark.parametrize("text, reason", [
    ("{", "JSONDecodeError"),
    ('{"no_configs": {}}', "configs"),
    ('{"configs": [1, 2]}', "object"),
    ('{"configs": {"gpu=X,prologue=norm,N=4,K=8": [4, 256, 4, 1]}}', "is not"),
    ('{"configs": {"gpu=X,prologue=plain,N=4,K=8": [4, 256, 4]}}', "BLOCK_N, BLOCK_K"),
    ('{"configs": {"gpu=X,prologue=plain,N=4,K=8": [4, 256.0, 4, 1]}}', "positive ints"),
    ('{"configs": {"gpu=X,prologue=plain,N=4,K=8": [4, 384, 4, 1]}}', "BLOCK_K must be"),
    ('{"configs": {"gpu=X,prologue=plain,N=4,K=8": [4, 256, 4, 9]}}', "num_stages"),
])
def test_malformed_file_is_an_error_naming_it(tmp_path, text, reason):
    path = tmp_path / "broken_gemv_configs.json"
    path.write_text(text)
    clear_cache()
    with pytest.raises(ValueError, match="malformed") as info:
        get_config("plain", 4, 8, "cpu", path)
    assert str(path) in str(info.value) and reason in str(info.value)
    clear_cache()


def test_shipped_file_is_well_formed():
    """The checked-in JSON (when there is one) loads; absent means the constants everywhere."""
    clear_cache()
    get_config("plain", 4096, 4096, "cpu", CONFIG_PATH)


def test_write_configs_merges(config_file, h100):
    key = shape_key(H100, "plain", 2048, 4096)
    new = shape_key("NVIDIA H200", "rms_norm", 5120, 2048)
    write_configs({key: (4, 512, 4, 1), new: (8, 512, 4, 1)}, "test", config_file)
    raw = json.loads(config_file.read_text())
    assert raw["note"] == "test" and len(raw["configs"]) == 4
    assert get_config("plain", 2048, 4096, "cuda", config_file) == (4, 512, 4, 1)
    assert get_config("rms_norm", 5120, 2048, "cuda", config_file) == (2, 1024, 4, 1)
    with pytest.raises(ValueError, match="power of two"):
        write_configs({key: (3, 512, 4, 1)}, "test", config_file)


@pytest.fixture
def launched(monkeypatch):
    """The tiles the GEMV kernel is launched with (the real kernel still runs)."""
    configs = []
    kernel = gemv_mod._gemv_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                configs.append(tuple(kwargs[name] for name in
                                     ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gemv_mod, "_gemv_kernel", Recording())
    return configs


def _point_at(monkeypatch, path, device: str, entries: dict) -> None:
    """Serve `entries` (keyed for this device's name) as the default JSON."""
    name = device_name(torch.device(device))
    path.write_text(json.dumps({"configs": {shape_key(name, p, n, k): cfg
                                            for (p, n, k), cfg in entries.items()}}))
    monkeypatch.setattr(gemv_mod, "CONFIG_PATH", path)
    clear_cache()


@pytest.mark.gpu
def test_kernels_with_looked_up_tiles_match_torch(device, tmp_path, monkeypatch, launched):
    from engine.layers.activation import silu_and_mul
    from engine.layers.norm import rms_norm

    n, k, dtype = 40, 256, torch.bfloat16  # small: the interpreter runs every program
    # tiles unlike the constants (1 row a program, narrow strips, a tail program for n=40)
    _point_at(monkeypatch, tmp_path / "gemv_configs.json", device, {
        ("plain", n, k): [1, 64, 2, 1], ("rms_norm", n, k): [16, 32, 4, 1],
        ("silu_mul", n, k): [8, 128, 2, 1]})
    assert get_config("rms_norm", n, k, device) == (16, 32, 4, 1)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    x, res = torch.randn(2, 1, k, device=device).to(dtype)
    g = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
    gate_up = torch.randn(1, 2 * k, device=device).to(dtype)

    assert_close(gemv_mod.gemv(x, w), F.linear(x.float(), w.float()), dtype, "plain")
    y, new_res = gemv_mod.rms_norm_gemv(x, res, g, 1e-5, w)
    h = x.float() + res.float()
    assert_close(y, F.linear(rms_norm(h, g.float(), 1e-5), w.float()), dtype, "rms_norm")
    assert_close(new_res, h, dtype, "new residual")
    assert_close(gemv_mod.silu_and_mul_gemv(gate_up, w),
                 F.linear(silu_and_mul(gate_up.float()), w.float()), dtype, "silu_mul")
    assert launched == [(1, 64, 2, 1), (16, 32, 4, 1), (8, 128, 2, 1)]
    clear_cache()


@pytest.mark.gpu
def test_explicit_config_wins(device, tmp_path, monkeypatch, launched):
    n, k, dtype = 8, 64, torch.bfloat16
    _point_at(monkeypatch, tmp_path / "gemv_configs.json", device,
              {("plain", n, k): [2, 32, 2, 1]})
    w = torch.randn(n, k, device=device).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    ref = F.linear(x.float(), w.float())
    assert_close(gemv_mod.gemv(x, w), ref, dtype, "looked up")
    assert_close(gemv_mod.gemv(x, w, config=(4, 16, 1, 1)), ref, dtype, "explicit")
    assert launched == [(2, 32, 2, 1), (4, 16, 1, 1)]
    clear_cache()


def test_swept_shapes_are_the_ones_dispatch_sends_to_the_gemv():
    """benchmarks/gemv_sweep.py --shapes lists only weights `supports` accepts (a cuBLAS shape
    would be swept for nothing), each model's once, Qwen3-30B-A3B's q/k/v and o included."""
    from benchmarks.gemv_sweep import MODEL_SHAPES, model_shapes, tile_candidates
    from engine.kernels.gemv import DEFAULT_CONFIGS, MAX_FUSED_SILU_ELEMENTS, supports

    assert {(n, k, p) for _, n, k, p in model_shapes("qwen3-moe")} == {
        (5120, 2048, "rms_norm"), (2048, 4096, "plain")}
    every = model_shapes("all")
    assert len(every) == len({(n, k, p) for _, n, k, p in every})
    assert len(every) == len({s[1:] for model in MODEL_SHAPES for s in MODEL_SHAPES[model]})
    for name, n, k, prologue in every:
        x = torch.empty(1, 2 * k if prologue == "silu_mul" else k, dtype=torch.bfloat16,
                        device="meta")
        limit = (MAX_FUSED_SILU_ELEMENTS if prologue == "silu_mul"
                 else gemv_mod.MAX_WEIGHT_ELEMENTS)
        assert supports(x, torch.empty(n, k, dtype=torch.bfloat16, device="meta"), limit), name
        candidates = tile_candidates(k, DEFAULT_CONFIGS[prologue])
        assert candidates[0] == DEFAULT_CONFIGS[prologue]
        assert len(set(candidates)) == len(candidates)
        assert all(cfg[1] <= k for cfg in candidates[1:])
