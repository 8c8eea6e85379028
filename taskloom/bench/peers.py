"""Peers run the same workload on the same weights in the same process, for a ratio:
HF transformers `generate_batch` (its continuous batching over a paged cache) and `generate`
(static batches), greedy, exactly `output_len` new tokens per prompt."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from taskloom.runtime.dtypes import torch_dtype

if TYPE_CHECKING:
    from transformers import ContinuousBatchingConfig

logger = logging.getLogger(__name__)


def load_hf_model(a: argparse.Namespace, attn_implementation: str | None = None
                  ) -> torch.nn.Module:
    """The HF transformers model for the same weights taskloom loaded (for random weights:
    the same shape, randomly initialised by transformers)."""
    import transformers

    dtype = torch_dtype(a.dtype)
    impl = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if a.random_weights:
        cfg = transformers.AutoConfig.for_model(**_random_config_dict(a.model))
        torch.manual_seed(a.weights_seed)
        with torch.device(a.device):  # initialise in place: an 8B model is slow to init on CPU
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, **impl)
    else:
        from taskloom.models.loader import resolve_model_path
        path = resolve_model_path(a.model)
        if path.endswith(".gguf"):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype, **impl)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **impl)
    return model.to(a.device).eval()


def _random_config_dict(model: str) -> dict:
    from taskloom.models.shapes import SHAPES, shape_config
    if model in SHAPES:
        return shape_config(model)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _left_pad(batch: list[list[int]], pad_id: int, device: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def paged_sdpa_name() -> str:
    """The name of SDPA over the paged cache for `generate_batch`: `paged|sdpa` up to
    transformers 5.18; from 5.19 plain `sdpa` (the prefix is deprecated there, then removed)."""
    import transformers
    from packaging.version import Version

    return "sdpa" if Version(transformers.__version__) >= Version("5.19") else "paged|sdpa"


def hf_generate_batch_throughput(a: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """Time HF `generate_batch` (continuous batching, SDPA attention over its paged cache)
    over all of `prompts` at once, `a.output_len` new tokens each (EOS ignored: no id
    matches -1). Not under inference mode: generate_batch runs its loop in a thread of its
    own, which must be able to update the model's tensors in place."""
    from transformers import GenerationConfig

    attn = paged_sdpa_name()
    model = load_hf_model(a, attn_implementation=attn)
    config = GenerationConfig(max_new_tokens=a.output_len, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    cb = _cpu_cache_budget(a, prompts)
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0),
        continuous_batching_config=cb)
    start = _synced_now(a.device)
    results = model.generate_batch(inputs=prompts, generation_config=config,
                                   continuous_batching_config=cb)
    elapsed = _synced_now(a.device) - start
    failed = [k for k, r in results.items() if r.error is not None]
    if failed or len(results) != len(prompts):
        raise RuntimeError(f"HF generate_batch finished {len(results) - len(failed)} of "
                           f"{len(prompts)} requests")
    n_out = sum(len(r.generated_tokens) for r in results.values())
    n_in = sum(len(p) for p in prompts)
    return {"name": "hf-transformers-generate_batch",
            "attn_implementation": attn,
            "output_tokens": n_out, "elapsed_s": round(elapsed, 3),
            "output_tokens_per_s": round(n_out / elapsed, 2),
            "total_tokens_per_s": round((n_in + n_out) / elapsed, 2)}


def _cpu_cache_budget(a: argparse.Namespace, prompts: list[list[int]]
                      ) -> ContinuousBatchingConfig | None:
    """On a CPU, `generate_batch`'s cache budget: blocks for every request at once and
    taskloom's `--max-num-batched-tokens`. Without one it sizes its cache and static
    buffers from the host's memory as from a GPU's, which on this 24 GiB machine took most
    of a small run's time. On a GPU: None, its own sizing from free memory, as taskloom's."""
    if a.device.startswith("cuda"):
        return None
    from transformers import ContinuousBatchingConfig

    block = 256                      # its default block size, said here to size by it
    blocks = sum(-(-(len(p) + a.output_len) // block) for p in prompts)
    return ContinuousBatchingConfig(block_size=block, num_blocks=blocks,
                                    max_batch_tokens=a.max_num_batched_tokens)


def _synced_now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.inference_mode()
def hf_generate_throughput(a: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """Time HF `generate` over `prompts` in batches, `a.output_len` new tokens each."""
    model = load_hf_model(a)
    batch_size = a.peer_batch_size or a.max_num_seqs
    gen = dict(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False,
               pad_token_id=0)
    warm_ids, warm_mask = _left_pad(prompts[:2], 0, a.device)
    model.generate(input_ids=warm_ids, attention_mask=warm_mask, **{**gen, "max_new_tokens": 4,
                                                                    "min_new_tokens": 4})
    n_out = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[i:i + batch_size], 0, a.device)
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
        n_out += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    elapsed = time.perf_counter() - start
    n_in = sum(len(p) for p in prompts)
    return {"name": "hf-transformers-generate", "batch_size": batch_size,
            "elapsed_s": round(elapsed, 3),
            "output_tokens_per_s": round(n_out / elapsed, 2),
            "total_tokens_per_s": round((n_in + n_out) / elapsed, 2)}


@torch.inference_mode()
def hf_generate_latency(a: argparse.Namespace, batches: list[list[list[int]]]) -> list[dict]:
    """Per batch: HF `generate`'s time to the first token (a 1-token generate) and its decode
    tokens/s over the remaining `a.output_len - 1` tokens."""
    model = load_hf_model(a)
    gen = dict(do_sample=False, pad_token_id=0)
    rows = []
    for prompts in batches:
        ids, mask = _left_pad(prompts, 0, a.device)
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4,
                       min_new_tokens=4, **gen)
        # decode = the whole generate less a 1-token one; where a few short steps on a busy
        # machine make that come out <= 0, both are timed again (three tries in all)
        for _ in range(3):
            ttft = _timed(a.device, lambda: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=1, **gen))
            total = _timed(a.device, lambda: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=a.output_len,
                min_new_tokens=a.output_len, **gen))
            decode = total - ttft
            if decode > 0:
                break
        steps = a.output_len - 1
        rows.append({"batch_size": len(prompts), "ttft_ms": round(1000 * ttft, 2),
                     "decode_tokens_per_s": round(len(prompts) * steps / decode, 2)
                     if decode > 0 else None})
    return rows


def _timed(device: str, fn) -> float:
    t0 = _synced_now(device)
    fn()
    return _synced_now(device) - t0
