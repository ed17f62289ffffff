"""What a Triton kernel compiles to on an H100/H200 (sm_90), without a GPU.

Triton's wheel carries ptxas and cuobjdump, so a kernel can be compiled for sm_90 on any
machine: this reports its registers per thread, shared memory, spills, and for each loop of the
SASS its size and instruction mix (MMAs, fp8 conversions, shared and global loads by width).
It cannot time anything; it tells what a kernel change does to the code, which is worth knowing
before a GPU is at hand (GPU time is scarce here): e.g. the fp8 decode kernel's 128 one-byte
shared loads per tile before the value slabs were transposed (engine/kv_cache/fp8.py).

Run: python benchmarks/sass_report.py -> results/sass_report_triton<version>.json
(a CPU machine is enough; tests/kernels/test_sass_fp8.py checks the fp8 decode kernel with it).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")
BYTE_LOADS = ("LDS.U8", "LDS.S8", "LDG.E.U8", "LDG.E.S8")


def available() -> bool:
    """Whether this Triton install can compile for sm_90 here (ptxas and cuobjdump present)."""
    return (_BIN / "ptxas").exists() and (_BIN / "cuobjdump").exists()


def compile_sm90(fn, signature: dict, constexprs: dict, divisible=(), **options):
    """Compile jit function `fn` for sm_90. signature: Triton types of the runtime arguments
    ('*bf16', 'i32', 'fp32', ...); divisible: arguments specialized as multiples of 16 (as a
    launch does for 16-aligned pointers and strides); options: num_warps, num_stages, ..."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([str(_BIN / "cuobjdump"), flag, path], capture_output=True,
                              text=True, check=True).stdout


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def loops(sass: str) -> list[collections.Counter]:
    """Instruction counts (by full opcode) of each loop: the span of every backward branch."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines())
              if m]
    found = []
    for addr, text in instrs:
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            found.append(collections.Counter(_opcode(t) for a, t in instrs if lo <= a <= addr))
    return found


def report(compiled) -> dict:
    """Registers, spills, shared memory and per-loop instruction mix of a compiled kernel."""
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    everything = collections.Counter(_opcode(m.group(2)) for m in
                                     map(_INSTR.match, sass.splitlines()) if m)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "shared_bytes": compiled.metadata.shared,
        "instructions": sum(everything.values()),
        "byte_loads": sum(everything[op] for op in BYTE_LOADS),
        "loops": [_loop_summary(c) for c in loops(sass)],
    }


def _loop_summary(ops: collections.Counter) -> dict:
    def count(prefix: str) -> int:
        return sum(v for k, v in ops.items() if k.startswith(prefix))

    return {"instructions": sum(ops.values()), "mma": count("HMMA") + count("HGMMA"),
            "fp8_to_f16": ops["F2FP.F16.E4M3.UNPACK_B"], "shared_loads": count("LDS"),
            "byte_loads": sum(ops[op] for op in BYTE_LOADS),
            "async_copies_16B": ops["LDGSTS.E.BYPASS.128"]}


def decode_kernel(fp8: bool, tile: tuple[int, int, int], head_dim: int = 128,
                  group: int = 4, block_size: int = 16):
    """The product's decode attention kernel at one split, as the engine launches it for a
    Llama-3-8B layer (GQA 4, head_dim 128) over a bf16 or fp8 cache."""
    from engine.kernels.decode_attention import _decode_kernel
    from engine.kernels.kv_tiles import values_chunk

    block_n, warps, stages = tile
    ints = ("q_stride_t", "q_stride_h", "o_stride_t", "o_stride_h", "table_stride",
            "kv_stride_block", "kv_stride_kv", "kv_stride_tok", "kv_stride_h", "group")
    sig = dict(q_ptr="*bf16", kv_ptr="*u8" if fp8 else "*bf16", tables_ptr="*i32",
               ctx_lens_ptr="*i32", out_ptr="*bf16", part_out_ptr="*fp32",
               part_lse_ptr="*fp32", counters_ptr="*i32", scale_log2e="fp32",
               **dict.fromkeys(ints, "i32"))
    divisible = [n for n in sig if n.endswith("_ptr") or n.startswith(("q_s", "o_s", "kv_s"))]
    consts = dict(HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=1, GROUP_PAD=16,
                  BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
                  DOT_PRECISION="tf32", FP8=fp8, VALUES_CHUNK=values_chunk(block_n, block_size),
                  FUSED_COMBINE=False, GROUP_POW2=triton.next_power_of_2(group),
                  COMBINE_CHUNK=1, USE_PDL=False)
    return compile_sm90(_decode_kernel, sig, consts, divisible, num_warps=warps,
                        num_stages=stages)


def prefill_kernel(fp8: bool, head_dim: int = 128, group: int = 4, block_size: int = 16):
    """The product's prefill attention kernel with the H100 tile the sweep chose for a
    Llama-3-8B layer (engine/kernels/prefill_attention_configs.json)."""
    from engine.kernels.prefill_attention import _prefill_kernel, launch_options
    from engine.kernels.prefill_attention_configs import PrefillTileConfig

    cfg = PrefillTileConfig(block_m=128, block_n=128, num_warps=8, num_stages=3,
                            pack_gqa=False, table_vec=False, warp_specialize=False,
                            heads_first=True)
    opts = launch_options(cfg, group, block_size, interpret=False)
    warps, stages = opts.pop("num_warps"), opts.pop("num_stages")
    ints = ("q_stride_t", "q_stride_h", "o_stride_t", "o_stride_h", "table_stride",
            "kv_stride_block", "kv_stride_kv", "kv_stride_tok", "kv_stride_h", "group")
    sig = dict(q_ptr="*bf16", kv_ptr="*u8" if fp8 else "*bf16", tables_ptr="*i32",
               ctx_lens_ptr="*i32", query_start_ptr="*i32", out_ptr="*bf16",
               scale_log2e="fp32", **dict.fromkeys(ints, "i32"))
    divisible = [n for n in sig if n.endswith("_ptr") or n.startswith(("q_s", "o_s", "kv_s"))]
    consts = dict(HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                  BLOCK_D=triton.next_power_of_2(head_dim), DOT_PRECISION="tf32", FP8=fp8,
                  **opts)
    return compile_sm90(_prefill_kernel, sig, consts, divisible, num_warps=warps,
                        num_stages=stages)


def router_kernel(add_rms_norm: bool, num_experts: int = 128, hidden: int = 2048,
                  top_k: int = 8):
    """The fused MoE router at batch 1 (Qwen3-30B-A3B shape), with or without the block's
    add + RMSNorm inside (engine/kernels/moe_router.py)."""
    from engine.kernels import moe_route
    from engine.kernels.moe_router import _router_kernel, default_tile

    tile = default_tile(1, num_experts, hidden)
    ptrs = dict(x_ptr="*bf16", w_ptr="*bf16", partial_ptr="*fp32", logits_ptr="*bf16",
                ticket_ptr="*i32", weights_ptr="*fp32", ids_ptr="*i64", counts_ptr="*i64",
                res_ptr="*bf16", norm_w_ptr="*bf16", res_out_ptr="*bf16", normed_ptr="*bf16")
    ints = ("num_tokens", "num_experts", "hidden", "x_stride", "res_stride", "w_stride",
            "split_columns")
    sig = dict(ptrs, eps="fp32", **dict.fromkeys(ints, "i32"))
    divisible = list(ptrs) + [n for n in ints if n != "num_tokens"]
    _, experts_p2, k_p2 = moe_route.routing_tile(num_experts, top_k)
    consts = dict(TOP_K=top_k, RENORMALIZE=True, HAS_COUNTS=True, ADD_RMS_NORM=add_rms_norm,
                  T_P2=1, BLOCK_E=tile.block_e, BLOCK_K=tile.block_k, SPLIT_K=tile.split_k,
                  ROWS=1, E_P2=experts_p2, K_P2=k_p2, USE_PDL=True)
    return compile_sm90(_router_kernel, sig, consts, divisible, num_warps=tile.num_warps)


def _rows_loop():
    """The split-free copy of the fp8 decode loop over the format before (values as rows)."""
    from benchmarks.fp8_decode_variants import _variant_kernel

    sig = dict(q_ptr="*bf16", kv_ptr="*u8", tables_ptr="*i32", ctx_lens_ptr="*i32",
               out_ptr="*bf16", scale_log2e="fp32", table_stride="i32", kv_stride_block="i32",
               kv_stride_kv="i32", kv_stride_tok="i32", kv_stride_h="i32")
    divisible = [n for n in sig if n.endswith("_ptr") or n.startswith("kv_s")]
    consts = dict(GROUP=4, GROUP_PAD=16, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128, MODE=1)
    return compile_sm90(_variant_kernel, sig, consts, divisible, num_warps=4, num_stages=2)


def one_report(kernel: str) -> dict:
    """`report` of 'decode-fp8' / 'decode-bf16' (default tiles) or 'prefill-fp8' /
    'prefill-bf16', compiled in a fresh process (tests run under TRITON_INTERPRET=1, where
    `triton.jit` gives interpreted functions that cannot be compiled)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__, "--one", kernel], capture_output=True,
                         text=True, env=env, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@triton.jit
def _probe_kernel(x_ptr, BLOCK: triton.language.constexpr):
    offs = triton.language.arange(0, BLOCK)
    triton.language.store(x_ptr + offs, triton.language.load(x_ptr + offs) + 1.0)


def offline_compile_works() -> str | None:
    """None if a trivial kernel compiles for sm_90 through `compile_sm90` in a fresh process,
    else why not (another Triton's compile API, no ptxas): tests skip on that, and fail only
    when the kernels they check compile and break their invariants."""
    if not available():
        return "this Triton has no ptxas / cuobjdump for sm_90"
    try:
        one_report("probe")
    except subprocess.CalledProcessError as e:
        return f"offline sm_90 compilation fails with this Triton ({triton.__version__}): " + (
            e.stderr.strip().splitlines() or ["?"])[-1]
    return None


def _one(kernel: str) -> dict:
    import torch

    if kernel == "probe":
        return report(compile_sm90(_probe_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 128},
                                   ["x_ptr"], num_warps=4))

    from engine.kernels.decode_attention import default_tile

    phase, kv = kernel.split("-")
    fp8 = kv == "fp8"
    if phase == "decode":
        tile = default_tile(torch.bfloat16, fp8)
        return {"tile": list(tile), **report(decode_kernel(fp8, tile))}
    return report(prefill_kernel(fp8))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        import json

        print(json.dumps(_one(sys.argv[2])))
        return
    from benchmarks.gpu_common import write_results
    from engine.kernels.decode_attention import default_tile

    import torch

    rows = []
    for fp8 in (False, True):
        tiles = {default_tile(torch.bfloat16, fp8), (64, 4, 2), (64, 4, 3), (128, 4, 2)}
        for tile in sorted(tiles):
            row = {"kernel": "decode", "kv": "fp8" if fp8 else "bf16", "tile": list(tile),
                   "default": tile == default_tile(torch.bfloat16, fp8),
                   **report(decode_kernel(fp8, tile))}
            main_loop = max(row["loops"], key=lambda loop: loop["instructions"])
            print({k: v for k, v in row.items() if k != "loops"}, "largest loop:", main_loop,
                  flush=True)
            rows.append(row)
    row = {"kernel": "decode, values as rows (before; fp8_decode_variants.py)", "kv": "fp8",
           "tile": [128, 4, 2], **report(_rows_loop())}
    print({k: v for k, v in row.items() if k != "loops"}, flush=True)
    rows.append(row)
    for fp8 in (False, True):
        row = {"kernel": "prefill", "kv": "fp8" if fp8 else "bf16", **report(prefill_kernel(fp8))}
        print({k: v for k, v in row.items() if k != "loops"}, "loops:", row["loops"], flush=True)
        rows.append(row)
    for norm in (False, True):
        row = {"kernel": "moe router" + (" + add_rms_norm" if norm else ""), "tokens": 1,
               **report(router_kernel(norm))}
        print({k: v for k, v in row.items() if k != "loops"}, flush=True)
        rows.append(row)
    path = write_results(f"sass_report_triton{triton.__version__}",
                         {"device": {"gpu": "sm90-offline"}, "triton": triton.__version__,
                          "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
