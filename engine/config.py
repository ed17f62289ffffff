"""Engine configuration: one dataclass per concern, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is visible")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is float32 on CPU (exact reference numerics) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


@dataclass(slots=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # fixed pool size; None -> from memory settings below
    cpu_kv_cache_bytes: int = 512 * 1024 * 1024  # pool size on CPU when num_blocks is None
    gpu_memory_utilization: float = 0.85  # fraction of free GPU memory the pool may take
    # Reuse the KV of full blocks a request shares with earlier ones (engine/kv_cache/
    # prefix_cache.py); a decode instance also skips receiving the blocks it holds.
    enable_prefix_caching: bool = True
    # "auto": the model's dtype; "fp8_e4m3": e4m3 K/V with a scale per (token, head), about
    # half the bytes in memory and on the wire (engine/kv_cache/fp8.py)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8_e4m3, "
                             f"got {self.kv_cache_dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous-batching limits per engine step."""

    max_num_seqs: int = 64  # requests in the running batch
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True  # split prompts longer than the remaining budget
    max_queued_requests: int | None = None  # bound on the waiting queue; None -> unbounded

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(slots=True)
class ParallelConfig:
    """How many ranks one instance spans: tensor x pipeline parallel (world = tp * pp)."""

    tensor_parallel_size: int = 1  # ranks that split every layer (heads, MLP, vocabulary)
    pipeline_parallel_size: int = 1  # stages that each own a contiguous range of layers
    # MoE only: 1, or tensor_parallel_size to split whole experts over the tensor ranks
    # (attention stays tensor parallel; engine/layers/moe.py)
    expert_parallel_size: int = 1
    # Layers per stage, first to last; None -> an even split (earlier stages take the extra).
    pipeline_layers: tuple[int, ...] | None = None
    # A plan, collective or rank start-up not done within this fails the instance.
    collective_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.pipeline_layers is not None:
            self.pipeline_layers = tuple(int(n) for n in self.pipeline_layers)
            if (len(self.pipeline_layers) != self.pipeline_parallel_size
                    or min(self.pipeline_layers) < 1):
                raise ValueError(f"pipeline_layers must give >= 1 layer to each of the "
                                 f"{self.pipeline_parallel_size} stages, got "
                                 f"{list(self.pipeline_layers)}")
        if self.expert_parallel_size not in (1, self.tensor_parallel_size):
            raise ValueError(f"expert_parallel_size must be 1 or tensor_parallel_size "
                             f"({self.tensor_parallel_size}): experts split over the tensor "
                             f"ranks, got {self.expert_parallel_size}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding (engine/spec/): a proposer drafts tokens, one target pass keeps the
    longest prefix the target agrees with (exactly its distribution), plus one more token."""

    method: str | None = None  # None (off) | "ngram" (prompt lookup) | "draft_model"
    num_speculative_tokens: int = 4  # k drafted per request and step at most
    max_ngram: int = 4
    min_ngram: int = 1
    # Drafting pauses while more requests than this run: a large batch is compute-bound, where
    # verifying k extra tokens per request costs more than the accepted ones save. None ->
    # min(32, 256 // (k + 1)): the most a verification step's sampled rows allow.
    max_batch_size: int | None = None
    # Draft only at batch sizes where verification steps measured more tokens per second than
    # plain decode steps (re-probed now and then: engine/spec/decoding.py Payoff).
    adaptive: bool = True
    # method "draft_model": a small model of the target's vocabulary ("default", an HF
    # directory or a .gguf), run on the target's device in its dtype (engine/spec/draft_model.py)
    draft_model: str | None = None
    # method "draft_model": tokens the draft catches up on per step (what it has not seen of
    # each sequence: a whole prompt on first use); a sequence whose catch-up does not fit
    # decodes plainly and continues next step. None -> scheduler.max_num_batched_tokens
    max_catch_up_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.method not in (None, "ngram", "draft_model"):
            raise ValueError(f"speculative method must be None, 'ngram' or 'draft_model', "
                             f"got {self.method!r}")
        if (self.method == "draft_model") != bool(self.draft_model):
            raise ValueError(f"draft_model must name a model exactly when method is "
                             f"'draft_model'; got method {self.method!r}, "
                             f"draft_model {self.draft_model!r}")
        if not 1 <= self.num_speculative_tokens <= 7:
            raise ValueError(f"num_speculative_tokens must be in [1, 7], "
                             f"got {self.num_speculative_tokens}")
        if self.max_catch_up_tokens is not None and self.max_catch_up_tokens < 2:
            raise ValueError(f"max_catch_up_tokens must be >= 2 (a sequence that decodes "
                             f"plainly grows by one token per step), got "
                             f"{self.max_catch_up_tokens}")
        if self.max_batch_size is None:
            self.max_batch_size = min(32, 256 // (self.num_speculative_tokens + 1))
        if (self.num_speculative_tokens + 1) * self.max_batch_size > 256:
            raise ValueError(f"(num_speculative_tokens + 1) * max_batch_size must be <= 256 "
                             f"(rows one verification step samples), got "
                             f"{(self.num_speculative_tokens + 1) * self.max_batch_size}")

    @property
    def enabled(self) -> bool:
        return self.method is not None


# Command-line spelling of `EngineConfig.async_scheduling` (pdserve generate, the benchmarks).
ASYNC_SCHEDULING_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


@dataclass(slots=True)
class EngineConfig:
    """Everything one engine instance needs: model, device and the two configs above."""

    model: str = "default"  # "default", an HF model directory, or a .gguf file
    device: str = "auto"  # cpu | cuda | auto
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None -> the model's context length
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    attention_backend: str = "auto"  # auto | torch | triton
    use_cuda_graphs: bool = True  # capture decode steps on CUDA
    # A step whose prompt chunks all end at or before this position runs in the decode graphs,
    # one row per token (engine/cuda_graphs.py), so a short prompt's prefill is one replay
    # instead of ~10 launches per layer. 0 disables.
    graph_prefill_max_context: int = 512
    # Plan and launch step N+1 before reading step N's sampled ids back (engine/inflight.py).
    # None -> on CUDA (it hides the host's per-step work behind the GPU's), off on CPU (where
    # nothing runs ahead of the host, so it would only add a wasted step per stop).
    async_scheduling: bool | None = None
    # Run every kernel variant once before serving (engine/warmup.py). None -> on CUDA (first
    # requests would pay Triton compiles), off on CPU (nothing compiles there).
    warmup: bool | None = None

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        resolve_dtype(self.dtype, self.device)  # validates
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.speculative.method == "draft_model" and self.parallel.world_size > 1:
            raise ValueError("speculative draft_model needs a one-rank instance "
                             "(tensor_parallel_size and pipeline_parallel_size 1)")
        if self.graph_prefill_max_context < 0:
            raise ValueError(f"graph_prefill_max_context must be >= 0 (0 disables), "
                             f"got {self.graph_prefill_max_context}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}"
            )

    @property
    def use_async_scheduling(self) -> bool:
        return self.device == "cuda" if self.async_scheduling is None else self.async_scheduling

    @property
    def use_warmup(self) -> bool:
        return self.device == "cuda" if self.warmup is None else self.warmup

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)
