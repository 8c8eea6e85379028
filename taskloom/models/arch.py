"""The architecture description of a Llama-family model.

One frozen dataclass covers Llama (with Llama-3 rope scaling), Mistral, Qwen2 (qkv bias) and
Qwen3 (q/k RMSNorm). It is parsed from a Hugging Face config.json dict or from GGUF metadata
(see `taskloom.models.loader`), or taken from a named shape for random-weight runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ArchConfig:
    """Shape and numerics of one decoder-only Llama-family model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # llama.cpp's per-frequency RoPE divisors (a GGUF `rope_freqs` tensor, how it stores
    # Llama-3 scaling): inv_freq[i] / rope_freq_factors[i]. Exclusive with rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    # Every layer attends to the last `sliding_window` positions only (Mistral v0.1's 4096;
    # Qwen2/Qwen3 with use_sliding_window on all layers). None: full causal attention.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ArchConfig":
        """Parse a Hugging Face config.json dict; raise ValueError for what we cannot run."""
        archs = cfg.get("architectures") or []
        model_type = next((SUPPORTED_ARCHITECTURES[a] for a in archs
                           if a in SUPPORTED_ARCHITECTURES), None)
        if model_type is None:
            model_type = cfg.get("model_type")
            if model_type not in SUPPORTED_ARCHITECTURES.values():
                raise ValueError(
                    f"unsupported architecture {archs or model_type!r}; taskloom runs "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=(model_type == "qwen2") or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=_sliding_window(cfg, model_type),
        )


def _sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    """The window every layer attends through, as Hugging Face reads the config: Mistral's
    `sliding_window` (4096 where the key is missing, HF's default), Qwen's only with
    `use_sliding_window`, for the layers from `max_window_layers` on (or as `layer_types`
    says). A window on some layers only is refused, not run as full attention."""
    if model_type == "mistral":
        return cfg.get("sliding_window", 4096)
    if model_type not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window"):
        return None
    window = cfg.get("sliding_window", 4096)
    if window is None:
        return None
    num_layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)]
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding == 0:
        return None
    if sliding != len(types):
        raise ValueError(f"this {model_type} config slides its attention window on {sliding} "
                         f"of {len(types)} layers; taskloom runs a window on every layer or "
                         "on none")
    return int(window)


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 folds rope_theta into "rope_parameters"; older configs use "rope_scaling".
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_theta(cfg: dict[str, Any]) -> float:
    return float(cfg.get("rope_theta") or _rope_params(cfg).get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> RopeScaling | None:
    params = _rope_params(cfg)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; taskloom supports 'llama3'")
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
