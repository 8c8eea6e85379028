"""Fidelity against Hugging Face transformers in float32 on the CPU.

For random tiny models of each architecture (Llama with Llama-3 rope scaling, Mistral with an
explicit head_dim, Qwen2 with q/k/v bias, Qwen3 with q/k norm and MQA, a tied-embedding Llama
with attention bias) saved with `save_pretrained` and loaded with `load_model`, and for the
embedded SmolLM2-135M GGUF (which HF dequantizes itself): logits over every prompt position
agree within 1e-3, and greedy continuations of 48 tokens are identical to HF `generate`.
Also: a sharded checkpoint, chunked prefill, and several sequences in one flat batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import transformers

from taskloom.config import ModelConfig
from taskloom.models.embedded import embedded_model_path
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.loader import load_model
from tests.models.hf_smollm import load_hf_smollm, load_hf_smollm_tokenizer
from tests.models.single_seq import SingleSequence, forward_batch, greedy_batch
from tests.models.tiny_models import TINY_CASES, build_tiny_hf, random_prompts

NEW_TOKENS = 48
LOGIT_ATOL = 1e-3
SMOLLM_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Photosynthesis is the process by which",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Pair:
    hf: transformers.PreTrainedModel
    ours: LlamaForCausalLM
    prompts: list[list[int]]


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    hf = build_tiny_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    loaded = load_model(ModelConfig(model=str(path)))
    assert loaded.path == str(path)
    return Pair(hf, loaded.model, random_prompts(hf.config.vocab_size, seed=7))


@torch.no_grad()
def hf_logits(hf: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    return hf(torch.tensor([prompt])).logits[0].float()       # [len, vocab]


@torch.no_grad()
def hf_greedy(hf: transformers.PreTrainedModel, prompts: list[list[int]]) -> list[list[int]]:
    """HF `generate(do_sample=False)` of NEW_TOKENS tokens (no stop token) for each prompt;
    several prompts go in one left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                      min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def max_len(prompts: list[list[int]]) -> int:
    return max(len(p) for p in prompts) + NEW_TOKENS


def check_logits(pair: Pair) -> None:
    for prompt in pair.prompts:
        ours = SingleSequence(pair.ours, max_len(pair.prompts)).prefill(prompt)
        expected = hf_logits(pair.hf, prompt)
        assert ours.shape == expected.shape and ours.dtype == torch.float32
        diff = (ours - expected).abs().max().item()
        assert diff <= LOGIT_ATOL, f"max |logit diff| {diff:.2e} for prompt {prompt[:8]}..."


def check_greedy(pair: Pair, batched: bool) -> None:
    """Ours (one sequence at a time, or all in flat batches) against HF generate (each prompt
    alone, or all in one padded batch)."""
    if batched:
        ours = greedy_batch(pair.ours, pair.prompts, NEW_TOKENS)
        expected = hf_greedy(pair.hf, pair.prompts)
    else:
        n = max_len(pair.prompts)
        ours = [SingleSequence(pair.ours, n).greedy(p, NEW_TOKENS)[0] for p in pair.prompts]
        expected = [hf_greedy(pair.hf, [p])[0] for p in pair.prompts]
    for i, (mine, theirs) in enumerate(zip(ours, expected)):
        assert len(theirs) == NEW_TOKENS
        assert mine == theirs, f"prompt {i}: greedy diverges at token {_first_diff(mine, theirs)}"


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_tiny_logits_match_hf(tiny: Pair) -> None:
    check_logits(tiny)


def test_tiny_greedy_matches_hf(tiny: Pair) -> None:
    check_greedy(tiny, batched=False)


def test_tiny_batched_greedy_matches_single(tiny: Pair) -> None:
    batched = greedy_batch(tiny.ours, tiny.prompts, NEW_TOKENS, block_size=8)
    n = max_len(tiny.prompts)
    assert batched == [SingleSequence(tiny.ours, n).greedy(p, NEW_TOKENS)[0]
                       for p in tiny.prompts]


def test_sharded_checkpoint_loads_like_single_file(tmp_path: os.PathLike) -> None:
    hf = build_tiny_hf("llama-llama3-gqa", seed=3)
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    assert len(shards) >= 3
    ours = load_model(ModelConfig(model=str(tmp_path / "sharded"))).model
    check_logits(Pair(hf, ours, random_prompts(hf.config.vocab_size, seed=11)[:2]))


@pytest.mark.parametrize("num_chunks", [2, 3])
def test_chunked_prefill_matches_one_prefill(tiny: Pair, num_chunks: int) -> None:
    prompt = max(tiny.prompts, key=len)
    whole = SingleSequence(tiny.ours, len(prompt)).prefill(prompt)
    chunked = SingleSequence(tiny.ours, len(prompt)).prefill(prompt, num_chunks=num_chunks)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_flat_batch_matches_one_sequence_at_a_time(tiny: Pair) -> None:
    batched = forward_batch(tiny.ours, tiny.prompts, block_size=4)
    for prompt, logits in zip(tiny.prompts, batched):
        alone = SingleSequence(tiny.ours, len(prompt), block_size=4).prefill(prompt)
        torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)


@dataclass
class Smol:
    pair: Pair
    texts: list[str]


@pytest.fixture(scope="module")
def smollm() -> Smol:
    """HF's own GGUF reading (dequantization, q/k un-permutation, config, tokenizer) of the
    embedded file, next to ours."""
    hf = load_hf_smollm()
    path = embedded_model_path()
    tokenizer = load_hf_smollm_tokenizer()
    prompts = [tokenizer(t)["input_ids"] for t in SMOLLM_PROMPTS]
    ours = load_model(ModelConfig())
    assert ours.path == path and ours.arch.tie_word_embeddings
    return Smol(Pair(hf, ours.model, prompts), SMOLLM_PROMPTS)


@pytest.mark.slow
def test_smollm2_gguf_logits_match_hf(smollm: Smol) -> None:
    assert all(len(p) >= 4 for p in smollm.pair.prompts)
    check_logits(smollm.pair)


@pytest.mark.slow
def test_smollm2_gguf_greedy_matches_hf(smollm: Smol) -> None:
    # Batched on both sides: five prompts one at a time would cost ~35 s on two CPU cores.
    check_greedy(smollm.pair, batched=True)
