"""Architecture description shared by the loaders, the model code and the KV cache.

One `ModelConfig` describes every supported model (the Llama family and its mixture-of-experts
relatives, `moe`). Loaders fill it from an HF `config.json` or from GGUF metadata; nothing else
parses those formats. Which architectures exist is the model registry's business
(`engine.models.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float  # how much longer the context is than the original
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """The sparse MLP of a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    num_experts: int
    top_k: int  # experts each token is routed to
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen2-MoE has a gated one)
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and it is not listed here (dense MLP)

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "intermediate_size", "decoder_sparse_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"moe {name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"moe top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` (HF index) has experts rather than a dense MLP."""
        return (layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and options of one Llama-family decoder-only model."""

    architecture: str  # a model_type of the registry (engine.models.registry)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    max_position_embeddings: int  # the model's context length
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 if configured)
    o_proj_bias: bool = False  # bias on the attention output (Llama/Qwen3 with attention_bias)
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    moe: MoEConfig | None = None  # experts in (some of) the MLPs; None: dense
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = "model"  # human-readable model name, reported by GetModelInfo

    def __post_init__(self) -> None:
        # imported here: the registry imports the model classes, which import this module
        from engine.models.registry import supported_architectures

        if self.architecture not in supported_architectures():
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(supported_architectures())}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
