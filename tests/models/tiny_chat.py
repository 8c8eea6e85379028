"""Test helper: a tiny random-weight Llama that speaks through the embedded model's tokenizer.

Engine-behaviour tests (batch invariance under chunking and preemption, drafts, prefix
caching) need text in and text out: chat templates, stop strings, detokenized streams. They
do not need the embedded model's 30 layers, whose decode step costs ~70 ms on a 2-core CPU.
This model has SmolLM2's tokenizer, chat template and special tokens, its whole vocabulary,
and two layers of hidden size 64: a decode step is a few milliseconds, host-bound as on a GPU.

Its weights are drawn so that the next-token distribution is peaked (logits of standard
deviation ~4 over the vocabulary): greedy choices are seldom near-ties (the median gap of
the top two logits is ~1.5), so a batch's float noise does not flip them, and sampling at
temperature ~1 still varies. A little of each token's embedding in the output head makes it
repeat tokens now and then, and fall into loops over longer greedy runs, as small models do,
so that draft heads starting from the model's own guess are accepted some of the time. Torch
and safetensors only: no transformers import.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file

from taskloom.models.embedded import embedded_model_path
from taskloom.tokenizer.tokenizer import Tokenizer

NAME = "tiny-chat-llama"
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
LOGIT_STD = 4.0
COPY = 0.2      # of the token embedding in the output head: greedy repeats a token now and then


def tiny_chat_model(base: Path) -> str:
    """The model's directory under `base`, written by the first caller (a file lock: the
    workers of one run share it) and reused by the others."""
    directory = base / NAME
    with FileLock(f"{directory}.lock"):
        if not (directory / "model.safetensors").exists():
            _write(directory)
    return str(directory)


def _write(directory: Path) -> None:
    tok = Tokenizer.from_gguf(embedded_model_path())
    directory.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(directory / "tokenizer.json"))
    ids = tok.backend.token_to_id
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "chat_template": tok.chat_template}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tok.vocab_size, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": ids(tok.bos_token), "eos_token_id": ids(tok.eos_token)}
    (directory / "config.json").write_text(json.dumps(config))
    partial = directory / "model.safetensors.partial"
    save_file(_weights(tok.vocab_size), str(partial))
    os.replace(partial, directory / "model.safetensors")


def _weights(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def linear(out: int, fan_in: int) -> torch.Tensor:
        return torch.randn(out, fan_in, generator=g) / fan_in ** 0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    embed = torch.randn(vocab, HIDDEN, generator=g)
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": norm(HIDDEN),
               "lm_head.weight": linear(vocab, HIDDEN) * LOGIT_STD + COPY * embed}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": norm(HIDDEN),
            p + "post_attention_layernorm.weight": norm(HIDDEN),
            p + "self_attn.q_proj.weight": linear(q, HIDDEN),
            p + "self_attn.k_proj.weight": linear(kv, HIDDEN),
            p + "self_attn.v_proj.weight": linear(kv, HIDDEN),
            p + "self_attn.o_proj.weight": linear(HIDDEN, q),
            p + "mlp.gate_proj.weight": linear(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": linear(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": linear(HIDDEN, INTERMEDIATE)})
    return weights
