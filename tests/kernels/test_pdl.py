"""Programmatic dependent launch: off where it cannot work, and on a Hopper GPU a CUDA graph of
PDL-launched kernels (each may start before its predecessor ends) gives bit-identical results
to the same kernels launched plainly."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import pdl


@pytest.fixture
def fresh_pdl_cache():
    pdl._enabled.cache_clear()
    yield
    pdl._enabled.cache_clear()


def test_off_on_cpu_tensors():
    assert pdl.launch_options(torch.zeros(1)) == {"USE_PDL": False}


def _chain(x, res, g, w_qkv, w_o, gate_up_w, down_w):
    """A batch-1 layer's worth of dependent kernels: norm+GEMV, GEMV, add+norm, cuBLAS,
    SiLU+GEMV."""
    from engine.kernels import dispatch

    qkv, res = dispatch.rms_norm_linear(x, res, g, 1e-5, w_qkv)
    o = dispatch.linear(qkv[:, : w_o.shape[1]], w_o)
    h, res = dispatch.add_rms_norm(o, res, g, 1e-5)
    return dispatch.silu_and_mul_linear(dispatch.linear(h, gate_up_w), down_w), res


@pytest.mark.gpu
def test_graph_of_pdl_kernels_matches_plain_launches(monkeypatch, fresh_pdl_cache):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper (sm_90) or newer GPU")
    torch.manual_seed(0)
    k, dt = 1024, torch.bfloat16
    x, res = torch.randn(2, 1, k, device="cuda", dtype=dt)
    g = torch.rand(k, device="cuda", dtype=dt) + 0.5
    w_qkv = torch.randn(3 * k // 2, k, device="cuda", dtype=dt) / k**0.5
    w_o = torch.randn(k, k, device="cuda", dtype=dt) / k**0.5
    gate_up_w = torch.randn(4 * k, k, device="cuda", dtype=dt) / k**0.5
    down_w = torch.randn(k, 2 * k, device="cuda", dtype=dt) / (2 * k) ** 0.5
    args = (x, res, g, w_qkv, w_o, gate_up_w, down_w)

    monkeypatch.setenv("PDSERVE_PDL", "0")
    plain = _chain(*args)
    monkeypatch.setenv("PDSERVE_PDL", "1")
    pdl._enabled.cache_clear()
    assert not pdl.launch_options(x)["USE_PDL"]  # eager launches stay plain
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert pdl.launch_options(x)["USE_PDL"]
        out = _chain(*args)
    for _ in range(20):  # replays race nothing: each kernel waits before touching data
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])
