"""SnapKV through the whole engine against HF transformers, float32 on the CPU.

The oracle is HF itself: the embedded SmolLM2-135M runs the prompt with eager attention and
`output_attentions`, each layer's kept positions are chosen from HF's own attention
probabilities of the observation window (summed over it, averaged over each KV head's query
heads, pooled, the best `budget - window` per head, ties to the earlier), HF's DynamicCache
is cut down to them, and HF decodes greedily over that cache at the true positions. taskloom
must give the same tokens through one-chunk and chunked prefill, a batch mixing compressed
and untouched prompts, prefix-cache hits, preemption in a small pool, speculative decoding
over a compressed prompt and async scheduling; every run ends with the pool full.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import transformers

from taskloom import LLM
from taskloom.bench.window import builtin_text
from taskloom.config import SnapKVConfig
from taskloom.sampling_params import SamplingParams
from tests.models.hf_smollm import load_hf_smollm

NEW_TOKENS = 12
SNAP = SnapKVConfig(64, window_size=16, kernel_size=5, pooling="avg")
PROMPT_LENS = [200, 40, 130]       # 40 is within the budget: never compressed


def kept_positions(attn: torch.Tensor, num_kv_heads: int, snap: SnapKVConfig) -> torch.Tensor:
    """SnapKV's choice from one layer's attention probabilities [heads, L, L]: [kvh, keep]."""
    heads, n, _ = attn.shape
    w = snap.window_size
    votes = attn[:, n - w:, :n - w].sum(dim=1)                      # [heads, L - w]
    votes = votes.view(num_kv_heads, heads // num_kv_heads, n - w).mean(dim=1)
    pool = F.avg_pool1d if snap.pooling == "avg" else F.max_pool1d
    votes = pool(votes[:, None], snap.kernel_size, 1, snap.kernel_size // 2)[:, 0]
    order = torch.sort(votes, dim=-1, descending=True, stable=True).indices
    return order[:, :snap.budget - w].sort(dim=-1).values


@torch.no_grad()
def hf_snapkv_greedy(hf: transformers.PreTrainedModel, prompt: list[int],
                     snap: SnapKVConfig) -> list[int]:
    n = len(prompt)
    out = hf(torch.tensor([prompt]), use_cache=True, output_attentions=True)
    cache = out.past_key_values
    if snap.compresses(n):
        kvh = hf.config.num_key_value_heads
        for layer, attn in zip(cache.layers, out.attentions):
            idx = kept_positions(attn[0], kvh, snap)               # [kvh, keep]
            for name in ("keys", "values"):
                full = getattr(layer, name)[0]                      # [kvh, L, d]
                picked = full[torch.arange(kvh)[:, None], idx]      # [kvh, keep, d]
                kept = torch.cat([picked, full[:, n - snap.window_size:]], dim=1)
                setattr(layer, name, kept[None].contiguous())
    tokens = [int(out.logits[0, -1].argmax())]
    for t in range(NEW_TOKENS - 1):
        past = cache.get_seq_length()
        out = hf(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True,
                 position_ids=torch.tensor([[n + t]]),
                 attention_mask=torch.ones(1, past + 1, dtype=torch.long))
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def prompts() -> list[list[int]]:
    from taskloom.tokenizer.tokenizer import load_tokenizer
    from taskloom.models.embedded import embedded_model_path
    ids = load_tokenizer(embedded_model_path()).encode(builtin_text()[:20000])
    out, at = [], 0
    for n in PROMPT_LENS:
        out.append(ids[at:at + n])
        at += n
    return out


@pytest.fixture(scope="module")
def expected() -> dict[str, list[list[int]]]:
    hf = load_hf_smollm()
    hf.set_attn_implementation("eager")
    batch = prompts()
    max_pool = SnapKVConfig(48, window_size=8, kernel_size=7, pooling="max")
    return {"avg": [hf_snapkv_greedy(hf, p, SNAP) for p in batch],
            "max": [hf_snapkv_greedy(hf, p, max_pool) for p in batch[:1]],
            "full": [hf_snapkv_greedy(hf, p, SnapKVConfig(10_000)) for p in batch[:1]]}


def greedy(llm: LLM, batch: list[list[int]], **kw) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]


def engine(snap: SnapKVConfig = SNAP, **kw) -> Iterator[LLM]:
    llm = LLM(snapkv=snap, block_size=16, **kw)
    yield llm
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.block_tables


def test_one_chunk_and_prefix_cache_hits_match_hf_over_its_compressed_cache(
        expected: dict[str, list[list[int]]]) -> None:
    batch = prompts()
    assert expected["avg"][0] != expected["full"][0]    # the compression changes the output
    for llm in engine(num_blocks=128):
        assert greedy(llm, batch) == expected["avg"]    # one batch, each prompt in one chunk
        assert llm.engine.scheduler.kv.num_compressed == 2
        assert greedy(llm, batch) == expected["avg"]    # again: prefix-cache hits
        assert llm.engine.scheduler.kv.stats.hits > 0


def test_chunked_prefill_and_preemption_in_a_small_pool(
        expected: dict[str, list[list[int]]]) -> None:
    # chunks of 48 tokens: the long prompts end in chunks cut to hold the whole window; 18
    # blocks of 16: the 200-token prompt needs 13 + 5 at its compressing step, then 5 or 6
    for llm in engine(num_blocks=18, max_num_batched_tokens=48, max_num_seqs=3):
        assert greedy(llm, prompts()) == expected["avg"]
        assert llm.engine.scheduler.num_preemptions > 0


def test_max_pooling_and_another_window(expected: dict[str, list[list[int]]]) -> None:
    snap = SnapKVConfig(48, window_size=8, kernel_size=7, pooling="max")
    for llm in engine(snap, num_blocks=64):
        assert greedy(llm, prompts()[:1]) == expected["max"]


def test_speculative_decoding_and_async_scheduling_over_compressed_prompts(
        expected: dict[str, list[list[int]]]) -> None:
    batch = prompts()
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    for llm in engine(num_blocks=128, speculative_config=spec):
        assert greedy(llm, batch) == expected["avg"]
        assert llm.engine.scheduler.spec_stats.num_draft_tokens > 0
    for llm in engine(num_blocks=128, async_scheduling=True):
        assert greedy(llm, batch) == expected["avg"]
