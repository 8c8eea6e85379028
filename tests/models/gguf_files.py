"""Test helper: write GGUF files the way llama.cpp's converter does, with `gguf.GGUFWriter`.

`write_gguf_from_hf` turns a Hugging Face model's config and state dict into a GGUF file:
llama.cpp tensor names (from gguf's own name map), its q/k permutation for `llama`-architecture
models, optional quantization of the matrices, and Llama-3 rope scaling as a `rope_freqs`
tensor, so that loader tests compare a GGUF load with a safetensors load of the same weights.
"""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch

from taskloom.models.arch import RopeScaling

_GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
              "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute` (n_head: heads of this projection)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_rope_factors(head_dim: int, theta: float, s: RopeScaling) -> list[float]:
    """The per-frequency divisors convert_hf_to_gguf.py writes as `rope_freqs.weight`."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            factors.append(1.0)
        elif wavelen > low_wl:
            factors.append(s.factor)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return factors


def _add_metadata(w: gguf.GGUFWriter, cfg, head_dim: int) -> None:
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def write_gguf_from_hf(path: str, cfg, state_dict: dict[str, torch.Tensor],
                       qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                       rope_scaling: RopeScaling | None = None,
                       qtype_of: dict[str, gguf.GGMLQuantizationType] | None = None) -> None:
    """Write an HF model (its `config` and `state_dict()`) as llama.cpp would convert it:
    matrices in `qtype`, or in `qtype_of[part]` for those whose HF name holds `part` (mixed
    files such as Q4_K_M, whose v and down projections are Q6_K)."""
    arch = _GGUF_ARCH[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _add_metadata(w, cfg, head_dim)
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        data = tensor.detach().float().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and ".q_proj." in name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and ".k_proj." in name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        kind = next((t for part, t in (qtype_of or {}).items() if part in name), qtype)
        kind = kind if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        w.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(data, kind),
                     raw_dtype=kind)
    if rope_scaling is not None:
        factors = llama_cpp_rope_factors(head_dim, cfg.rope_parameters["rope_theta"], rope_scaling)
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
