"""Triton compilations after start-up are counted and named (engine/compile_watch.py).

On the CPU nothing compiles (the interpreter runs kernels), so these tests drive the hook the
way Triton calls it; tests/kernels/test_compile_watch_cuda.py compiles a real kernel on a GPU.
"""

from __future__ import annotations

import logging

import pytest

triton = pytest.importorskip("triton")
knobs = pytest.importorskip("triton.knobs")

from engine.compile_watch import MAX_LOGGED, CompileWatch  # noqa: E402


@pytest.fixture
def restore_hook():
    saved = knobs.runtime.jit_cache_hook
    yield
    knobs.runtime.jit_cache_hook = saved


def _triton_call(**overrides):
    """The keyword arguments Triton's JITFunction passes its cache hook (triton/runtime/jit.py)."""
    kwargs = dict(key=("k",), repr="_gemv_kernel[num_warps=4](x: *bf16, n: i32)", fn=None,
                  compile={}, is_manual_warmup=False, already_compiled=False)
    kwargs.update(overrides)
    return knobs.runtime.jit_cache_hook(**kwargs)


def test_armed_watch_counts_names_and_never_vetoes(restore_hook, caplog):
    calls = []
    knobs.runtime.jit_cache_hook = lambda **kw: calls.append(kw["repr"])  # another tool's hook
    watch = CompileWatch()
    assert not watch.armed and watch.count == 0
    assert watch.arm() and watch.arm()  # idempotent: installed once
    with caplog.at_level(logging.WARNING, logger="engine.compile_watch"):
        results = [_triton_call(repr=f"kernel_{i}[num_warps=4]()") for i in range(MAX_LOGGED + 5)]
    assert not any(results)  # a truthy return would make Triton skip the compilation
    assert watch.count == MAX_LOGGED + 5
    assert calls == [f"kernel_{i}[num_warps=4]()" for i in range(MAX_LOGGED + 5)]  # chained
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == MAX_LOGGED and "kernel_0[num_warps=4]()" in warnings[0]
    assert list(watch.recent)[-1] == f"kernel_{MAX_LOGGED + 4}[num_warps=4]()"


def test_unarmed_watch_counts_nothing(restore_hook):
    knobs.runtime.jit_cache_hook = None
    watch = CompileWatch()
    assert knobs.runtime.jit_cache_hook is None
    assert watch.count == 0


def test_count_reaches_core_stats_and_the_metric(restore_hook, monkeypatch, tmp_path):
    from engine import compile_watch
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.metrics import EngineMetrics
    from pdserve.metrics import MetricFactory
    from prometheus_client import CollectorRegistry
    from tests.engine.factories import save_tiny_hf_model

    watch = CompileWatch()
    monkeypatch.setattr(compile_watch, "WATCH", watch)
    model = save_tiny_hf_model(tmp_path / "llama", "llama", extra_config={"num_hidden_layers": 1})
    engine = LLMEngine(EngineConfig(model=str(model), device="cpu"))
    assert engine.stats().triton_compiles_after_ready == 0
    watch.arm()
    _triton_call()
    _triton_call()
    assert engine.stats().triton_compiles_after_ready == 2
    registry = CollectorRegistry()
    metrics = EngineMetrics(MetricFactory("tiny", registry))
    metrics.publish(engine)
    metrics.publish(engine)  # totals, not increments: published once
    assert registry.get_sample_value("pdserve:triton_compiles_after_ready_total",
                                     {"model_name": "tiny"}) == 2


class _Fn:
    name = "_decode_kernel"


def _decode_call(stride_spec):
    """A hook call shaped as Triton 3.6-3.9 make it: signature in argument order, constants
    keyed by (index,), divisibility attributes in configs[0]."""
    attrs = {(0,): [["tt.divisibility", 16]]}
    if stride_spec == "/16":
        attrs[(1,)] = [["tt.divisibility", 16]]
    constants = {(2,): 64}
    sig = {"q_ptr": "*bf16", "bt_stride": "i32", "BLOCK_N": "constexpr"}
    if stride_spec == "=1":
        sig["bt_stride"] = "constexpr"
        constants[(1,)] = 1
    return dict(key="k", repr="_decode_kernel[num_warps=4](q_ptr: ()", fn=_Fn(),
                compile={"key": "k", "signature": sig, "constants": constants,
                         "configs": [attrs]},
                is_manual_warmup=False, already_compiled=False)


def test_describe_names_each_arguments_specialization():
    from engine.compile_watch import describe

    assert describe(_decode_call("/16")) == (
        "_decode_kernel", ("q_ptr: *bf16/16", "bt_stride: i32/16", "BLOCK_N=64"))
    assert describe(_decode_call("=1"))[1][1] == "bt_stride=1"
    assert describe(dict(repr="k[num_warps=4](x: ()", compile={})) == (
        "k", ("k[num_warps=4](x: ()",))  # another shape: Triton's own text


def test_a_miss_is_named_by_what_it_changes_from_the_warm_up(restore_hook, caplog):
    knobs.runtime.jit_cache_hook = None
    watch = CompileWatch()
    assert watch.record()
    knobs.runtime.jit_cache_hook(**_decode_call("/16"))  # compiled by the warm-up
    assert watch.count == 0 and not watch.armed
    watch.arm()
    with caplog.at_level(logging.WARNING, logger="engine.compile_watch"):
        knobs.runtime.jit_cache_hook(**_decode_call(""))
    assert watch.count == 1
    message = caplog.records[-1].getMessage()
    assert "_decode_kernel(q_ptr: *bf16/16, bt_stride: i32, BLOCK_N=64)" in message
    assert message.endswith("in: bt_stride: i32 (was bt_stride: i32/16)")


def test_a_later_engines_warm_up_is_not_counted_but_remembered(restore_hook, caplog):
    knobs.runtime.jit_cache_hook = None
    watch = CompileWatch()
    watch.arm()
    with watch.paused():
        knobs.runtime.jit_cache_hook(**_decode_call("/16"))
    assert watch.count == 0 and not watch.recent
    with caplog.at_level(logging.WARNING, logger="engine.compile_watch"):
        knobs.runtime.jit_cache_hook(**_decode_call(""))
    assert watch.count == 1
    assert caplog.records[-1].getMessage().endswith("(was bt_stride: i32/16)")
