"""Rotary position embedding (neox / rotate-half style): the torch reference.

The cos/sin table is computed once, in float32 on the CPU, for every position up to the model's
maximum, and looked up per token by position, so a flat batch of many sequences at different
positions needs no padding. Frequencies follow Hugging Face exactly: plain RoPE, Llama-3
scaling (`_compute_llama3_parameters`), or llama.cpp's per-frequency divisors (the
`rope_freqs` tensor of a GGUF file, which is how llama.cpp stores Llama-3 scaling).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from taskloom.models.arch import RopeScaling
from taskloom.ops.attention import write_kv_cache

# (positions, query, key, cos_sin_cache) -> (rotated query, rotated key)
RotaryFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    tuple[torch.Tensor, torch.Tensor]]
# (positions, query, key, value, cos_sin_cache, kv_cache, slot_mapping) -> rotated query; the
# rotated key and the value are stored at their slots of the paged KV cache
RotaryToCacheFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """`1 / base**(2i/head_dim)` for i < head_dim/2, in float32 on the CPU."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (base ** exponents)                         # [head_dim // 2]


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama-3 frequency scaling, the same float32 operations as HF's
    `_compute_llama3_parameters`: long wavelengths are divided by `factor`, short ones kept,
    the band between interpolated smoothly."""
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq                          # [head_dim // 2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((old_context_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, base: float, scaling: RopeScaling | None = None,
                  freq_factors: tuple[float, ...] | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32, CPU) for one of the supported schemes."""
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    if scaling is not None and freq_factors is not None:
        raise ValueError("give either rope scaling or rope frequency factors, not both")
    inv_freq = default_inv_freq(head_dim, base)
    if scaling is not None:
        return llama3_inv_freq(inv_freq, scaling)
    if freq_factors is not None:
        if len(freq_factors) != head_dim // 2:
            raise ValueError(
                f"rope frequency factors must have head_dim/2 = {head_dim // 2} entries, "
                f"got {len(freq_factors)}")
        return inv_freq / torch.tensor(freq_factors, dtype=torch.float32, device="cpu")
    return inv_freq


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads,
    head_dim] by each token's position ([num_tokens] int64), looked up in cos_sin_cache
    [max_position, head_dim] (cos | sin, float32) and rounded to the query dtype."""
    cos_sin = cos_sin_cache.index_select(0, positions)   # [num_tokens, head_dim]
    cos, sin = cos_sin.to(query.dtype).unsqueeze(1).chunk(2, dim=-1)  # [num_tokens, 1, d/2]
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def apply_rotary_to_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`apply_rotary`, then the rotated key and `value` stored at each token's slot of the
    paged KV cache (`taskloom.ops.attention.write_kv_cache`); returns the rotated query."""
    query, key = apply_rotary(positions, query, key, cos_sin_cache)
    write_kv_cache(key, value, kv_cache, slot_mapping)
    return query


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [num_tokens, heads, head_dim]; the same products as HF's x*cos + rotate_half(x)*sin.
    x1, x2 = x.chunk(2, dim=-1)                              # [num_tokens, heads, head_dim // 2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flat query and key tensors given each token's position.

    The table `cos_sin_cache` [max_position, head_dim] holds cos in its first half and sin in
    its second; it is a float32 buffer created on the CPU even when the model is built on the
    meta device, and moves with the model. `rotate` does the rotation: `apply_rotary` (the
    reference) or a kernel with the same signature; `rotate_to_cache` the rotation fused with
    the KV-cache write (`to_cache`).
    """

    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: RopeScaling | None = None,
                 freq_factors: tuple[float, ...] | None = None,
                 rotate: RotaryFn = apply_rotary,
                 rotate_to_cache: RotaryToCacheFn = apply_rotary_to_cache) -> None:
        super().__init__()
        if max_position < 1:
            raise ValueError(f"max_position must be >= 1, got {max_position}")
        self.head_dim = head_dim
        self.max_position = max_position
        self.rotate = rotate
        self.rotate_to_cache = rotate_to_cache
        inv_freq = rope_inv_freq(head_dim, base, scaling, freq_factors)  # [head_dim // 2]
        t = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = t[:, None] * inv_freq[None, :]               # [max_position, head_dim // 2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, head_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] int64 (each < max_position); query: [num_tokens,
        num_heads, head_dim]; key: [num_tokens, num_kv_heads, head_dim]. Returns the rotated
        query and key, same shapes and dtypes."""
        return self.rotate(positions, query, key, self.cos_sin_cache)

    def to_cache(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate query and key, and store the rotated key and `value` at each token's slot
        ([num_tokens] int64, block_id * block_size + offset) of the layer's paged KV cache.
        Returns the rotated query."""
        return self.rotate_to_cache(positions, query, key, value, self.cos_sin_cache,
                                    kv_cache, slot_mapping)
