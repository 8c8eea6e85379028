"""Sliding-window attention and attention sinks through the whole engine, against HF
transformers: a tiny Mistral whose own `sliding_window` HF applies, and a tiny Llama given a
window and sinks by taskloom, checked against HF's forward with the same mask passed in.
Greedy tokens must be identical through chunked prefill, batching, preemption, prefix-cache
hits and speculative decoding, while the pool is smaller than the requests' whole contexts."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from taskloom import LLM
from taskloom.config import AttentionWindow
from taskloom.sampling_params import SamplingParams
from tests.models.tiny_models import TINY, build_tiny_hf

NEW_TOKENS = 40
WINDOW = 24
SINKS = 4
PROMPT_LENS = [70, 9, 45, 100]


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    out = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    out.append(out[0][:50] + out[0][:30])   # a repeat: prompt lookup finds drafts in it
    return out


def windowed_mask(length: int, window: AttentionWindow) -> torch.Tensor:
    """The additive [1, 1, length, length] mask: causal, within the window or a sink."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    visible = (k <= q) & ((k > q - window.size) | (k < window.num_sink_tokens))
    return torch.zeros(length, length).masked_fill(~visible, float("-inf"))[None, None]


@torch.no_grad()
def hf_greedy(hf: transformers.PreTrainedModel, prompt: list[int],
              window: AttentionWindow | None) -> list[int]:
    """Greedy tokens from full forwards, no KV cache: with `window`, under its mask passed
    to HF as a 4-D attention mask; without, HF's own masks (Mistral's sliding window)."""
    ids = list(prompt)
    dev = hf.device
    for _ in range(NEW_TOKENS):
        x = torch.tensor([ids], device=dev)
        mask = None if window is None else windowed_mask(len(ids), window).to(dev)
        logits = hf(x, attention_mask=mask, use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def greedy(llm: LLM, batch: list[list[int]], **kw) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(
        batch, params, use_tqdm=False)]


def assert_pool_full(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.block_tables


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[list[int]]]:
    overrides = {"head_dim": 16, "sliding_window": WINDOW,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    config = transformers.MistralConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("mistral-window")
    hf.save_pretrained(path, safe_serialization=True)
    batch = prompts(TINY["vocab_size"])
    return str(path), [hf_greedy(hf, p, None) for p in batch]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[list[int]]]:
    hf = build_tiny_hf("llama-llama3-gqa", seed=2)
    path = tmp_path_factory.mktemp("llama-sinks")
    hf.save_pretrained(path, safe_serialization=True)
    batch = prompts(TINY["vocab_size"])
    return str(path), [hf_greedy(hf, p, AttentionWindow(WINDOW, SINKS)) for p in batch]


def engine(path: str, **kw) -> Iterator[LLM]:
    llm = LLM(path, skip_tokenizer_init=True, block_size=8, **kw)
    yield llm
    assert_pool_full(llm)


def test_mistral_sliding_window_matches_hf_in_a_pool_smaller_than_its_contexts(
        mistral: tuple[str, list[list[int]]]) -> None:
    path, expected = mistral
    batch = prompts(TINY["vocab_size"])
    # 10 blocks of 8 hold 80 tokens; the longest request has 140. Chunks of 16 tokens.
    for llm in engine(path, num_blocks=10, max_num_batched_tokens=16, max_num_seqs=4):
        assert llm.engine.scheduler.kv.window == AttentionWindow(WINDOW, 0)
        assert greedy(llm, batch) == expected
        assert llm.engine.scheduler.num_preemptions > 0     # and some were preempted
    for llm in engine(path, num_blocks=64, sliding_window=256):    # the window turned off
        assert greedy(llm, batch) != expected


def test_llama_with_window_and_sinks_matches_hf_under_the_same_mask(
        llama: tuple[str, list[list[int]]]) -> None:
    path, expected = llama
    batch = prompts(TINY["vocab_size"])
    for llm in engine(path, num_blocks=64, sliding_window=WINDOW, num_sink_tokens=SINKS):
        assert greedy(llm, batch) == expected           # one batch, prompts in one chunk
        assert greedy(llm, batch) == expected           # again: prefix-cache hits
        assert llm.engine.scheduler.kv.stats.hits > 0
    for llm in engine(path, num_blocks=12, max_num_batched_tokens=8, max_num_seqs=2,
                      sliding_window=WINDOW, num_sink_tokens=SINKS):
        assert greedy(llm, batch) == expected           # small chunks, a small pool
    for llm in engine(path, num_blocks=64, sliding_window=WINDOW):     # no sinks
        assert greedy(llm, batch) != expected


def test_llama_with_sinks_and_speculative_decoding_matches_hf(
        llama: tuple[str, list[list[int]]]) -> None:
    path, expected = llama
    batch = prompts(TINY["vocab_size"])
    for llm in engine(path, num_blocks=64, sliding_window=WINDOW, num_sink_tokens=SINKS,
                      speculative_config={"num_speculative_tokens": 3}):
        assert greedy(llm, batch) == expected
        assert llm.engine.scheduler.spec_stats.num_draft_tokens > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["mistral", "llama-sinks"])
def test_windowed_engine_on_cuda_matches_hf_there(case: str, tmp_path: Path) -> None:
    """Triton kernels and CUDA graphs (decode steps replay them) under the window, in fp32,
    against HF on the same device; a pool smaller than the contexts."""
    if case == "mistral":
        overrides = {"head_dim": 16, "sliding_window": WINDOW,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
        torch.manual_seed(0)
        hf = transformers.MistralForCausalLM(
            transformers.MistralConfig(**{**TINY, **overrides})).eval()
        window, kw = None, {}
    else:
        hf = build_tiny_hf("llama-llama3-gqa", seed=2)
        window = AttentionWindow(WINDOW, SINKS)
        kw = {"sliding_window": WINDOW, "num_sink_tokens": SINKS}
    hf.save_pretrained(tmp_path, safe_serialization=True)
    batch = prompts(TINY["vocab_size"])
    expected = [hf_greedy(hf.cuda(), p, window) for p in batch]
    for llm in engine(str(tmp_path), device="cuda", num_blocks=24, max_model_len=256, **kw):
        graphs = llm.engine.runner.graphs
        assert graphs is not None
        replays: list[int] = []
        run = graphs.run
        graphs.run = lambda *args: replays.append(1) or run(*args)
        assert greedy(llm, batch) == expected
        assert replays


def test_sinks_without_a_window_are_refused(llama: tuple[str, list[list[int]]]) -> None:
    with pytest.raises(ValueError, match="needs a sliding window"):
        LLM(llama[0], skip_tokenizer_init=True, num_sink_tokens=4)
