"""The one Llama-family model definition: Llama (incl. Llama-3 rope scaling), Mistral, Qwen2
(q/k/v bias) and Qwen3 (per-head q/k RMSNorm), with GQA, explicit head_dim and tied or untied
embeddings.

The forward pass runs over a flat, unpadded batch of tokens from many sequences; attention
writes each layer's new keys/values into the paged KV cache and reads every sequence's context
back through `AttentionMetadata`. q/k/v and gate/up projections are fused linears whose
parameters load from Hugging Face's separate tensors through per-parameter `weight_loader`s.
The definition knows nothing of quantization or tensor parallelism: those swap modules after
the model is built. The ops (torch references or Triton kernels) are chosen once, by whoever
builds the model, and handed down to every layer.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from taskloom.models.arch import ArchConfig
from taskloom.models.weights import default_weight_loader, set_weight_attrs, sharded_weight_loader
from taskloom.ops.backend import TORCH_OPS, Ops
from taskloom.ops.kv_compress import snapkv_compress
from taskloom.ops.rotary import RotaryEmbedding
from taskloom.runtime.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# HF tensor name part -> (fused parameter name part, shard id)
_FUSED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_FUSED_RE = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add (see `taskloom.ops.rmsnorm`)."""

    def __init__(self, hidden_size: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(hidden_size))
        set_weight_attrs(self.weight, weight_loader=default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(norm(x + residual), x + residual)`."""
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    for param in layer.parameters():
        set_weight_attrs(param, weight_loader=default_weight_loader)
    return layer


def _fused_linear(in_features: int, shard_sizes: dict[Hashable, int], bias: bool) -> nn.Linear:
    """A linear whose output rows are the concatenation of several HF projections."""
    shards, offset = {}, 0
    for shard_id, size in shard_sizes.items():
        shards[shard_id] = (offset, size)
        offset += size
    layer = nn.Linear(in_features, offset, bias=bias)
    for param in layer.parameters():
        set_weight_attrs(param, weight_loader=sharded_weight_loader(shards),
                         shard_ids=tuple(shards), shard_rows=shards)
    return layer


class LlamaAttention(nn.Module):
    """Self-attention over the paged KV cache (GQA, optional q/k/v bias, optional q/k norm)."""

    def __init__(self, config: ArchConfig, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = _fused_linear(
            config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=config.attention_bias)
        self.o_proj = _linear(self.q_size, config.hidden_size, bias=_o_proj_bias(config))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops) if config.qk_norm else None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rotary: RotaryEmbedding) -> torch.Tensor:
        """hidden: [n, hidden] -> [n, hidden]; this step's keys/values go into `kv_cache`."""
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)                          # [n, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)      # [n, num_heads, head_dim]
        k = k.reshape(n, self.num_kv_heads, self.head_dim)   # [n, num_kv_heads, head_dim]
        v = v.reshape(n, self.num_kv_heads, self.head_dim)   # [n, num_kv_heads, head_dim]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # the rotated keys go straight to the cache with the values (one launch on the GPU)
        q = rotary.to_cache(positions, q, k, v, kv_cache, meta.slot_mapping)
        out = self.ops.paged_attention(q, kv_cache, meta, self.scale)  # [n, num_heads, head_dim]
        for plan in meta.kv_compressions:   # prompts this step ends, compressed (SnapKV)
            snapkv_compress(q, kv_cache, plan, self.scale)
        return self.o_proj(out.reshape(n, self.q_size))      # [n, hidden]


def _o_proj_bias(config: ArchConfig) -> bool:
    # HF's Llama/Mistral/Qwen3 give o_proj a bias whenever attention_bias is set; Qwen2's
    # attention_bias means q/k/v biases only.
    return config.attention_bias and config.model_type != "qwen2"


class LlamaMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up fused into one linear."""

    def __init__(self, config: ArchConfig, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        inter = config.intermediate_size
        self.gate_up_proj = _fused_linear(config.hidden_size, {0: inter, 1: inter}, bias=False)
        self.down_proj = _linear(inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                       # [n, 2 * intermediate]
        return self.down_proj(self.ops.silu_and_mul(gate_up))  # [n, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    def __init__(self, config: ArchConfig, ops: Ops) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, ops)
        self.mlp = LlamaMLP(config, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttentionMetadata,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(mlp_out, residual)`; the caller adds them (fused into the next norm)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)            # [n, hidden]
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, rotary)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ArchConfig, ops: Ops) -> None:
        super().__init__()
        self.config = config
        # An explicit (empty) weight skips nn.Embedding's normal_ init, slow on the meta device.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size))
        set_weight_attrs(self.embed_tokens.weight, weight_loader=default_weight_loader)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config, ops) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling, config.rope_freq_factors, rotate=ops.rotary,
            rotate_to_cache=ops.rotary_to_cache)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        return self.forward_embedded(self.embed_tokens(input_ids), positions, kv_caches, meta)

    def forward_embedded(self, hidden: torch.Tensor, positions: torch.Tensor,
                         kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """The decoder and final norm over embeddings hidden [n, hidden]."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(
                f"expected one KV cache per layer ({len(self.layers)}), got {len(kv_caches)}")
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta,
                                     self.rotary_emb)
        hidden, _ = self.norm.add_and_norm(hidden, residual)
        return hidden                                        # [n, hidden]


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over flat batches and a paged KV cache.

    Build it under `torch.device("meta")`, materialise it (`taskloom.models.weights.
    materialize`), then `load_weights` from Hugging Face-named tensors. With tied embeddings
    there is no `lm_head`: logits use `model.embed_tokens.weight`. `ops` are the op
    implementations every layer calls (`taskloom.ops.backend.select_ops` picks them for a
    device); the torch references by default.
    """

    def __init__(self, config: ArchConfig, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.config = config
        self.ops = ops
        self.model = LlamaModel(config, ops)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, bias=False)
        # A second form of the lm head for calls of at most `small_batch_head.max_rows` rows,
        # set by the loader where one is faster there (on the CPU in bf16: a C loop over the
        # head, or over a GGUF Q8_0 head kept 8-bit, taskloom.ops.small_linear); it computes
        # what the head does, within a rounding.
        self.small_batch_head: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] int64 over all scheduled tokens of all sequences;
        kv_caches: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` per layer.
        Returns the final hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]."""
        head = self.small_batch_head
        if head is not None and hidden.shape[0] <= head.max_rows:
            return head(hidden).float()                          # [n, vocab]
        return F.linear(hidden, self.lm_head_weight()).float()   # [n, vocab]

    def lm_head_weight(self) -> torch.Tensor:
        """The lm head [vocab, hidden]: the input embedding when they are tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into place; raise ValueError on an unexpected name, a wrong
        shape, or (at the end) parameters that received no data."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[Hashable]] = {}
        for hf_name, tensor in weights:
            if _IGNORED_RE.search(hf_name):
                continue
            if hf_name == "lm_head.weight" and self.lm_head is None:
                logger.debug("tied embeddings: ignoring lm_head.weight in the checkpoint")
                continue
            name, shard_id = param_name(hf_name)
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"unexpected weight {hf_name!r}: the model ({self.config.model_type}, "
                    f"{self.config.num_hidden_layers} layers) has no parameter {name!r}")
            try:
                param.weight_loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"weight {hf_name!r}: {e}") from None
            loaded.setdefault(name, set()).add(shard_id)
        missing = _missing(params, loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights: {', '.join(missing)}")


def _missing(params: dict[str, nn.Parameter], loaded: dict[str, set[Hashable]]) -> list[str]:
    """Names of parameters (or shards of fused ones) that received no data; a parameter
    `filled_by` another (a 4-bit weight's scales) is filled when that one is."""
    missing = []
    for name, param in params.items():
        if getattr(param, "filled_by", None) is not None:
            continue
        shard_ids = getattr(param, "shard_ids", None)
        if shard_ids is None:
            if name not in loaded:
                missing.append(name)
            continue
        absent = [str(s) for s in shard_ids if s not in loaded.get(name, set())]
        if absent:
            missing.append(f"{name} (shards {', '.join(absent)})")
    return missing


def param_name(hf_name: str) -> tuple[str, Hashable]:
    """HF tensor name -> (our parameter name, shard id or None): `...q_proj.weight` ->
    (`...qkv_proj.weight`, "q")."""
    match = _FUSED_RE.search(hf_name)
    if match is None:
        return hf_name, None
    fused, shard_id = _FUSED[match.group(1)]
    return hf_name[:match.start()] + f".{fused}." + hf_name[match.end():], shard_id
