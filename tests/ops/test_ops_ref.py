"""Torch reference ops against Hugging Face's implementations: RMSNorm (plain and fused with
the residual add), rotary embedding (plain and Llama-3 scaled, and llama.cpp's frequency
divisors), and the gated SiLU."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from taskloom.models.arch import RopeScaling
from taskloom.ops.activation import silu_and_mul
from taskloom.ops.rmsnorm import fused_add_rms_norm, rms_norm
from taskloom.ops.rotary import RotaryEmbedding, rope_inv_freq
from tests.models.gguf_files import llama_cpp_rope_factors

LLAMA31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
TINY_LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)


def _hf_norm(hidden: int, eps: float, dtype: torch.dtype, seed: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=gen))
    return norm.to(dtype)


@pytest.mark.parametrize("hidden", [96, 576, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_hf(dtype: torch.dtype, hidden: int) -> None:
    hf = _hf_norm(hidden, 1e-5, dtype, seed=0)
    x = (3 * torch.randn(7, 5, hidden, generator=torch.Generator().manual_seed(1))).to(dtype)
    ours = rms_norm(x, hf.weight, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert torch.equal(ours, hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_matches_hf_residual_then_norm(dtype: torch.dtype) -> None:
    hf = _hf_norm(64, 1e-6, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 64, generator=gen).to(dtype)
    residual = torch.randn(11, 64, generator=gen).to(dtype)
    normed, new_residual = fused_add_rms_norm(x, residual, hf.weight, 1e-6)
    expected_residual = residual + x              # HF's decoder layer: residual + hidden
    assert torch.equal(new_residual, expected_residual)
    assert torch.equal(normed, hf(expected_residual))


def test_fused_add_rms_norm_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(3, 8\) and \(2, 8\)"):
        fused_add_rms_norm(torch.ones(3, 8), torch.ones(2, 8), torch.ones(8), 1e-6)


def _hf_config(head_dim: int, theta: float, scaling: RopeScaling | None,
               max_pos: int) -> LlamaConfig:
    params: dict = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params = {"rope_type": "llama3", "rope_theta": theta, "factor": scaling.factor,
                  "low_freq_factor": scaling.low_freq_factor,
                  "high_freq_factor": scaling.high_freq_factor,
                  "original_max_position_embeddings": scaling.original_max_position_embeddings}
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=params)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (64, 10000.0, None), (128, 500000.0, LLAMA31), (16, 10000.0, TINY_LLAMA3)])
def test_inv_freq_is_bitwise_hf(head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
    config = _hf_config(head_dim, theta, scaling, 1024)
    kind = "default" if scaling is None else "llama3"
    if kind == "default":
        expected = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))[0]
    assert torch.equal(rope_inv_freq(head_dim, theta, scaling), expected)


@pytest.mark.parametrize("head_dim,theta,scaling,heads,kv_heads", [
    (64, 100000.0, None, 9, 3), (128, 500000.0, LLAMA31, 4, 1), (16, 10000.0, TINY_LLAMA3, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_hf(head_dim: int, theta: float, scaling: RopeScaling | None,
                           heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    max_pos = 4096
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.cat([torch.arange(5), torch.randint(0, max_pos, (27,), generator=gen)])
    q = torch.randn(len(positions), heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(len(positions), kv_heads, head_dim, generator=gen).to(dtype)
    rope = RotaryEmbedding(head_dim, max_pos, theta, scaling)
    q_out, k_out = rope(positions, q, k)

    hf_rope = LlamaRotaryEmbedding(_hf_config(head_dim, theta, scaling, max_pos))
    cos, sin = hf_rope(q, positions[None])                   # [1, n, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert q_out.dtype == dtype and q_out.shape == q.shape
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1))
    assert not torch.allclose(q_out.float(), q.float())     # it did rotate


@pytest.mark.parametrize("head_dim,theta,scaling", [(128, 500000.0, LLAMA31),
                                                    (16, 10000.0, TINY_LLAMA3)])
def test_gguf_rope_freq_factors_reproduce_llama3(head_dim: int, theta: float,
                                                 scaling: RopeScaling) -> None:
    factors = tuple(llama_cpp_rope_factors(head_dim, theta, scaling))
    assert len(set(factors)) > 2                             # all three bands present
    torch.testing.assert_close(rope_inv_freq(head_dim, theta, freq_factors=factors),
                               rope_inv_freq(head_dim, theta, scaling), rtol=1e-6, atol=0)


def test_rotary_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="head_dim must be even, got 15"):
        RotaryEmbedding(15, 8, 10000.0)
    with pytest.raises(ValueError, match="head_dim/2 = 8 entries, got 3"):
        RotaryEmbedding(16, 8, 10000.0, freq_factors=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="not both"):
        RotaryEmbedding(16, 8, 10000.0, TINY_LLAMA3, freq_factors=(1.0,) * 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = torch.randn(6, 2 * 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    gate, up = x[:, :40].double(), x[:, 40:].double()
    expected = gate / (1 + torch.exp(-gate)) * up            # silu(g) = g * sigmoid(g)
    out = silu_and_mul(x)
    assert out.shape == (6, 40) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="even last dimension"):
        silu_and_mul(torch.ones(2, 7))
