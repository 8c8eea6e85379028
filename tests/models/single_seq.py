"""Test helper: run a model on one growing sequence (or a few at once) through the paged KV cache.

`SingleSequence` owns a KV cache whose blocks 0..n-1 belong to its one sequence; it prefills a
prompt (in one or several chunks) and then decodes one token per step, building the
`AttentionMetadata` the model runner would build. `forward_batch` runs several prompts as one
flat batch. Greedy decoding here is the oracle that fidelity tests compare with HF generate.
"""
from __future__ import annotations

import torch

from taskloom.models.arch import ArchConfig
from taskloom.models.llama import LlamaForCausalLM
from taskloom.runtime.attention import AttentionMetadata, flat_batch_metadata


def make_metadata(block_tables: list[list[int]], num_cached: list[int], query_lens: list[int],
                  block_size: int, device: torch.device) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions for sequences that have `num_cached[i]` tokens in the cache and
    `query_lens[i]` new ones in this step, laid out one after another in the flat batch."""
    return flat_batch_metadata(block_tables, num_cached, query_lens, block_size, device)


def new_kv_caches(arch: ArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> list[torch.Tensor]:
    """Zeroed KV caches, one `[2, num_blocks, block_size, num_kv_heads, head_dim]` per layer."""
    shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device)
            for _ in range(arch.num_hidden_layers)]


def _param_dtype_device(model: LlamaForCausalLM) -> tuple[torch.dtype, torch.device]:
    param = model.model.embed_tokens.weight
    return param.dtype, param.device


class SingleSequence:
    """One sequence of up to `max_len` tokens, fed chunk by chunk."""

    def __init__(self, model: LlamaForCausalLM, max_len: int, block_size: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        dtype, self.device = _param_dtype_device(model)
        num_blocks = -(-max_len // block_size)
        self.block_table = list(range(num_blocks))
        self.kv_caches = new_kv_caches(model.config, num_blocks, block_size, dtype, self.device)
        self.num_tokens = 0

    @torch.inference_mode()
    def feed(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens (one chunk); returns their float32 logits [len(token_ids), vocab]."""
        meta, positions = make_metadata([self.block_table], [self.num_tokens], [len(token_ids)],
                                        self.block_size, self.device)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions, self.kv_caches, meta)  # [len, hidden]
        self.num_tokens += len(token_ids)
        return self.model.compute_logits(hidden)

    def prefill(self, prompt: list[int], num_chunks: int = 1) -> torch.Tensor:
        """Feed the prompt in `num_chunks` near-equal chunks; logits of every prompt position."""
        bounds = [round(i * len(prompt) / num_chunks) for i in range(num_chunks + 1)]
        return torch.cat([self.feed(prompt[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a])

    def greedy(self, prompt: list[int], max_new_tokens: int,
               num_chunks: int = 1) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation (no stop token) and the prompt's logits [len(prompt), vocab]."""
        prompt_logits = self.prefill(prompt, num_chunks)
        out = [int(prompt_logits[-1].argmax())]
        while len(out) < max_new_tokens:
            out.append(int(self.feed([out[-1]])[-1].argmax()))
        return out, prompt_logits


@torch.inference_mode()
def forward_batch(model: LlamaForCausalLM, prompts: list[list[int]],
                  block_size: int = 16) -> list[torch.Tensor]:
    """All prompts prefilled in ONE flat batch (disjoint blocks, handed out in reverse order so
    that block ids differ from positions); returns each prompt's logits [len, vocab]."""
    dtype, device = _param_dtype_device(model)
    counts = [-(-len(p) // block_size) for p in prompts]
    ids = list(reversed(range(sum(counts))))
    tables = [ids[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(prompts))]
    kv_caches = new_kv_caches(model.config, sum(counts), block_size, dtype, device)
    meta, positions = make_metadata(tables, [0] * len(prompts), [len(p) for p in prompts],
                                    block_size, device)
    flat = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    logits = model.compute_logits(model(flat, positions, kv_caches, meta))  # [total, vocab]
    return list(logits.split([len(p) for p in prompts]))


@torch.inference_mode()
def greedy_batch(model: LlamaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                 block_size: int = 16) -> list[list[int]]:
    """Greedy continuations of several prompts decoded together: one flat prefill of all
    prompts, then one flat step per token with every sequence's next token."""
    dtype, device = _param_dtype_device(model)
    counts = [-(-(len(p) + max_new_tokens) // block_size) for p in prompts]
    starts = [sum(counts[:i]) for i in range(len(prompts))]
    tables = [list(range(s, s + c)) for s, c in zip(starts, counts)]
    kv_caches = new_kv_caches(model.config, sum(counts), block_size, dtype, device)
    outputs: list[list[int]] = [[] for _ in prompts]
    chunks, cached = [list(p) for p in prompts], [0] * len(prompts)
    while len(outputs[0]) < max_new_tokens:
        meta, positions = make_metadata(tables, cached, [len(c) for c in chunks], block_size,
                                        device)
        flat = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=device)
        hidden = model(flat, positions, kv_caches, meta)     # [num_tokens, hidden]
        last = torch.tensor(meta.query_start_loc_cpu[1:], device=device) - 1
        next_ids = model.compute_logits(hidden[last]).argmax(dim=-1).tolist()  # [num_seqs]
        for i, token in enumerate(next_ids):
            outputs[i].append(token)
            cached[i] += len(chunks[i])
            chunks[i] = [token]
    return outputs
