"""Build an engine from an EngineConfig: load weights and tokenizer, size the KV pool, wire the
scheduler, runner and engine core together."""
from __future__ import annotations

import logging

import torch

from taskloom.config import CacheConfig, EngineConfig
from taskloom.engine.core import EngineCore
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.scheduler import Scheduler
from taskloom.models.arch import ArchConfig
from taskloom.models.loader import load_model
from taskloom.runtime.model_runner import ModelRunner, torch_dtype
from taskloom.tokenizer.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def num_kv_blocks(cache: CacheConfig, arch: ArchConfig, dtype: torch.dtype,
                  device: torch.device) -> int:
    """How many KV blocks the pool gets: `num_blocks` if set, else what the memory budget
    holds (`kv_cache_memory_gb` on CPU, `gpu_memory_utilization` of the device on GPU)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    block_bytes = cache.block_size * arch.kv_bytes_per_token(dtype.itemsize)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cache.gpu_memory_utilization) * total
    else:
        budget = cache.kv_cache_memory_gb * 2**30
    blocks = int(budget // block_bytes)
    if blocks < 1:
        raise ValueError(f"the KV-cache memory budget ({budget / 2**30:.3f} GiB) holds no "
                         f"block of {block_bytes} bytes; give the cache more memory")
    return blocks


def build_engine(config: EngineConfig) -> EngineCore:
    """Load the model named by `config.model` and return a ready engine core."""
    loaded = load_model(config.model)
    arch = loaded.arch
    tokenizer: Tokenizer | None = None
    if not config.model.random_weights:
        tokenizer = load_tokenizer(loaded.path)
    eos = tuple(dict.fromkeys((tokenizer.eos_token_ids if tokenizer else ())
                              + arch.eos_token_ids))
    device = torch.device(config.model.device)
    dtype = torch_dtype(config.model.dtype)
    max_model_len = config.model.max_model_len or arch.max_position_embeddings
    num_blocks = num_kv_blocks(config.cache, arch, dtype, device)
    logger.info("KV cache: %d blocks of %d tokens (%d tokens), max_model_len %d", num_blocks,
                config.cache.block_size, num_blocks * config.cache.block_size, max_model_len)
    runner = ModelRunner(loaded.model, arch, num_blocks, config.cache.block_size, dtype,
                         device, eos)
    kv = KVCacheManager(num_blocks, config.cache.block_size)
    scheduler = Scheduler(config.scheduler, kv, max_model_len)
    return EngineCore(scheduler, runner, tokenizer, arch.vocab_size, eos)
