"""What the multi-GPU benchmarks (issues 20 and 21) share: the `--device cpu --tiny` dry-run
switch, model folders of a real shape with random weights, where results go, and the checks
that refuse to start on too few GPUs or without the cluster's packages.

Every multi-rank engine loads its weights from a folder (each rank reads its own slices), so
the benchmarks write one: on a GPU machine a real architecture's shape with random bf16 weights
(`save_random_hf_folder`: HF's own tensor names, one safetensors file per layer, written from
the GPU), on CPU a tiny random model (tests/engine/factories.py, moe_factories.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}  # NVLink multicast can take the GPUs down
os.environ.update(NCCL_SAFE_ENV)

# HF config.json fields of the shapes measured (random weights: only the shapes matter)
HF_SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                        rope_theta=500000.0, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, rope_theta=1e6, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          tie_word_embeddings=False),
}
# the tiny stand-in of each shape for the CPU dry run: (factory, arch, extra config)
TINY_STAND_INS = {"llama-3-8b": ("dense", "llama", {"num_hidden_layers": 4}),
                  "llama-3-70b": ("dense", "llama", {"num_hidden_layers": 4,
                                                     "num_attention_heads": 8,
                                                     "num_key_value_heads": 4}),
                  "qwen3-30b-a3b": ("moe", "qwen3_moe", {"num_hidden_layers": 2})}


@dataclass(frozen=True, slots=True)
class RunMode:
    """Where a benchmark runs: CUDA with NCCL and real shapes, or a CPU dry run (Gloo, tiny
    models, a handful of tokens) that takes the same code path."""

    device: str  # "cuda" or "cpu"
    tiny: bool
    out_dir: Path  # result JSON goes here

    @property
    def dtype(self) -> str:
        return "float32" if self.device == "cpu" else "bfloat16"

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run over Gloo (needs --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, few tokens")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="result JSON; default benchmarks/results/ on CUDA, a temp dir on CPU")


def mode_from_args(args: argparse.Namespace, min_gpus: int) -> RunMode:
    if args.device == "cpu" and not args.tiny:
        raise ValueError("--device cpu needs --tiny (real shapes are for GPUs)")
    if args.device == "cuda":
        require_gpus(min_gpus)
    out_dir = args.out_dir or (RESULTS_DIR if args.device == "cuda"
                               else Path(tempfile.mkdtemp(prefix="pdserve-dry-run-")))
    out_dir.mkdir(parents=True, exist_ok=True)
    return RunMode(args.device, args.tiny, out_dir)


def require_gpus(count: int) -> None:
    found = torch.cuda.device_count()
    if found < count:
        raise SystemExit(f"needs {count} GPUs, found {found}: run it on a machine with "
                         f"{count} (issue 20: nvidia-h200-x2, issue 21: nvidia-h200-x4)")


def require_cluster_packages() -> None:
    """The cluster path needs Ray and grpcio >= 1.85 (the generated stubs check it); the GPU
    machines have neither unless .whl/ (shared/device/make-wheels.sh) was carried and
    installed into /tmp/site."""
    problems = []
    try:
        import ray  # noqa: F401
    except ImportError:
        problems.append("ray is not installed")
    try:
        import grpc

        if tuple(int(x) for x in grpc.__version__.split(".")[:2]) < (1, 85):
            problems.append(f"grpcio {grpc.__version__} is older than 1.85")
    except ImportError:
        problems.append("grpcio is not installed")
    if problems:
        raise SystemExit("; ".join(problems) + ": build .whl/ with shared/device/make-wheels.sh, "
                         "carry it, and install it first (benchmarks/multigpu_suite.sh install)")


def write_json(mode: RunMode, name: str, payload: dict) -> Path:
    """<out_dir>/<name>_<device>.json (device: the GPU's name, or cpu-dry-run)."""
    tag = (torch.cuda.get_device_name(0).replace(" ", "-") if mode.device == "cuda"
           else "cpu-dry-run")
    path = mode.out_dir / f"{name}_{tag}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if os.environ.get("OUT"):  # the suites collect everything under $OUT
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    return path


def gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {"gpus": 0, "torch": torch.__version__}
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                          timeout=20).stdout
    return {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "topology": topo.splitlines()[:6]}


def model_folder(shape: str, mode: RunMode, root: Path, seed: int = 0,
                 num_layers: int | None = None) -> Path:
    """A folder holding `shape` (HF_SHAPES) with random weights, or the first `num_layers` of
    it; the tiny stand-in on CPU. A folder written before (its tokenizer is written last) is
    reused."""
    suffix = "-tiny" if mode.tiny else (f"-{num_layers}l" if num_layers else "")
    folder = root / (shape + suffix)
    if (folder / "tokenizer_config.json").exists():
        return folder
    if mode.tiny:
        from tests.engine.factories import save_tiny_hf_model
        from tests.engine.moe_factories import save_tiny_moe_model

        kind, arch, extra = TINY_STAND_INS[shape]
        save = save_tiny_moe_model if kind == "moe" else save_tiny_hf_model
        return save(folder, arch, seed=seed, extra_config=extra)
    fields = dict(HF_SHAPES[shape], **({"num_hidden_layers": num_layers} if num_layers else {}))
    return save_random_hf_folder(fields, folder, seed)


def save_random_hf_folder(fields: dict, folder: Path, seed: int = 0, std: float = 0.02,
                          device: str = "cuda") -> Path:
    """An HF model folder of this shape with random bf16 weights, written layer by layer.

    The tensor names are whatever `save_pretrained` writes for the architecture: a one-layer
    model of the same width is saved first and its layer-0 names are repeated for every layer.
    Each tensor is drawn on `device` (norms = 1), so a 70B-shaped folder is bounded by the
    disk's write speed, not by host RAM or a CPU random generator."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    folder.mkdir(parents=True, exist_ok=True)
    probe_dir = folder / "probe"
    probe_config = AutoConfig.for_model(config.model_type, **{**fields, "num_hidden_layers": 1})
    with torch.device(device):
        AutoModelForCausalLM.from_config(probe_config, dtype=torch.bfloat16).save_pretrained(
            probe_dir, safe_serialization=True, max_shard_size="100GB")
    names: dict[str, tuple] = {}
    for file in probe_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}

    def write(file_name: str, shapes: dict[str, tuple]) -> None:
        tensors = {name: _random(name, shape, gen, std, device) for name, shape in shapes.items()}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))

    layer0 = {k: s for k, s in names.items() if ".layers.0." in k}
    for i in range(config.num_hidden_layers):
        write(f"layer-{i:03d}.safetensors",
              {k.replace(".layers.0.", f".layers.{i}."): s for k, s in layer0.items()})
    write("other.safetensors", {k: s for k, s in names.items() if k not in layer0})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    _save_tokenizer(folder)
    for file in probe_dir.iterdir():
        file.unlink()
    probe_dir.rmdir()
    return folder


def _random(name: str, shape: tuple, gen: torch.Generator, std: float,
            device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    x = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen)
    return x.cpu()


def _save_tokenizer(folder: Path) -> None:
    """The default model's tokenizer (only its ids matter); a saved copy where the GPU machine
    lacks the default model (PDSERVE_BENCH_TOKENIZER or PDSERVE_TEST_TOKENIZER_DIR: .tok/)."""
    saved = os.environ.get("PDSERVE_BENCH_TOKENIZER") or os.environ.get(
        "PDSERVE_TEST_TOKENIZER_DIR")
    if saved:
        for file in Path(saved).iterdir():
            if file.is_file():
                (folder / file.name).write_bytes(file.read_bytes())
        return
    from tests.engine.factories import default_hf_tokenizer

    default_hf_tokenizer().save_pretrained(folder)


def first_difference(reference, prompt: list[int], got: list[int], want: list[int]) -> dict:
    """Equal, or where the two greedy sequences first part and how close the reference's top
    two logits were there (a near-tie explains a difference; nothing after it is compared)."""
    from tests.helpers import next_logits

    if got == want:
        return {"equal": True}
    k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        return {"equal": False, "lengths": [len(got), len(want)], "near_tie": False}
    logits = next_logits(reference, prompt + want[:k]).float()
    gap = float(logits[want[k]] - logits[got[k]])
    rel = abs(gap) / float(logits.abs().max())
    # bf16: a split layer adds its partial sums in another order; fp32 differs far less
    tolerance = 1e-3 if reference.config.dtype == "float32" else 2e-2
    return {"equal": False, "first_difference": k, "logit_gap": gap, "relative_gap": rel,
            "near_tie": rel < tolerance, "tolerance": tolerance}


def pack_unpack_s(kv_cache: torch.Tensor, num_blocks: int, sync, iters: int = 5
                  ) -> tuple[float, float]:
    """Median seconds to gather `num_blocks` blocks of every layer into one buffer, and to
    scatter it back (the same bytes: the cache is unchanged); `sync` waits for the device."""
    import statistics
    import time

    from kv_transfer.packing import pack_blocks, unpack_blocks

    ids = torch.arange(num_blocks, device=kv_cache.device)
    layers = slice(0, kv_cache.shape[0])
    buf = pack_blocks(kv_cache, ids, layers)
    times: dict[str, list[float]] = {"pack": [], "unpack": []}
    for _ in range(iters + 1):
        for name, run in (("pack", lambda: pack_blocks(kv_cache, ids, layers, out=buf)),
                          ("unpack", lambda: unpack_blocks(kv_cache, ids, layers, buf))):
            sync()
            started = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["pack"][1:]), statistics.median(times["unpack"][1:])
