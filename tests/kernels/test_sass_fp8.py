"""The fp8 attention kernels compiled for sm_90 (H100/H200) on this CPU machine, with the ptxas
and cuobjdump Triton ships (benchmarks/sass_report.py): no load is one byte wide and nothing
spills in decode. Before the value slabs were transposed (engine/kv_cache/fp8.py), the decode
kernel read each 8-bit value tile from shared memory one byte at a time (128 LDS.U8 per thread
per 128-key tile, 211 registers); no interpreter test can see that, and GPU time is scarce."""

from __future__ import annotations

import pytest

sass_report = pytest.importorskip("benchmarks.sass_report")


@pytest.fixture(scope="module", autouse=True)
def _offline_compiler():
    why = sass_report.offline_compile_works()
    if why:
        pytest.skip(why)


def test_fp8_decode_kernel_loads_whole_vectors_without_spills():
    got = sass_report.one_report("decode-fp8")
    assert got["byte_loads"] == 0, got
    assert got["stack_bytes"] == 0, f"the fp8 decode kernel spills: {got}"
    block_n, warps, _ = got["tile"]
    main_loop = max(got["loops"], key=lambda loop: loop["instructions"])
    # the tile's K and V: e4m3 -> fp16 conversions (two elements each), 16-byte async copies
    per_thread = 2 * block_n * 128 // (32 * warps)
    assert main_loop["fp8_to_f16"] == per_thread // 2, main_loop
    assert main_loop["async_copies_16B"] == per_thread // 16, main_loop
    assert main_loop["byte_loads"] == 0, main_loop


def test_fp8_prefill_kernel_loads_whole_vectors():
    got = sass_report.one_report("prefill-fp8")
    assert got["byte_loads"] == 0, {k: v for k, v in got.items() if k != "loops"}
