"""Test helper: random tiny Hugging Face models of each architecture taskloom runs.

Each case is a tiny config (vocab 256, hidden 64, two layers) of one architecture and
feature: Llama with Llama-3 rope scaling and GQA, a tied-embedding Llama with attention bias
and full multi-head attention, Mistral with an explicit head_dim, Qwen2 with q/k/v bias, Qwen3
with q/k norm and one KV head.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

NUM_PROMPTS = 5
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# config.json of a tiny Llama for `LLM(path, random_weights=True)`: no weights, no tokenizer.
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False}


def write_tiny_config(directory: Path) -> str:
    """Write TINY_LLAMA_CONFIG as directory/config.json; return its path."""
    path = directory / "config.json"
    path.write_text(json.dumps(TINY_LLAMA_CONFIG))
    return str(path)


# name -> (HF config class, HF model class, overrides of TINY)
TINY_CASES = {
    "llama-llama3-gqa": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-tied-bias-mha": ("LlamaConfig", "LlamaForCausalLM",
                            {"tie_word_embeddings": True, "attention_bias": True,
                             "num_key_value_heads": 4}),
    "mistral-head-dim-32": ("MistralConfig", "MistralForCausalLM",
                            {"head_dim": 32, "sliding_window": None,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3-qk-norm-mqa": ("Qwen3Config", "Qwen3ForCausalLM",
                          {"head_dim": 32, "num_key_value_heads": 1}),
}


def build_tiny_hf(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random HF model of a tiny config; norms and biases perturbed so they matter."""
    config_cls, model_cls, overrides = TINY_CASES[case]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def random_prompts(vocab: int, seed: int) -> list[list[int]]:
    """NUM_PROMPTS prompts of random token ids, 3 to 39 tokens long."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (NUM_PROMPTS,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
