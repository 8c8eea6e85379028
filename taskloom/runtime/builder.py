"""Build an engine from an EngineConfig: load weights and tokenizer, swap in oneDNN-packed
projections on a CPU in bf16/fp16 and LoRA projections when adapters are served, size the KV
pool (on a GPU by a profiling step, see `taskloom.runtime.memory`), capture CUDA graphs, wire
the scheduler, runner and engine core together."""
from __future__ import annotations

import logging

import torch

from taskloom.config import EngineConfig, SpeculativeConfig, resolve_window
from taskloom.engine.core import EngineCore
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.model_drafts import ModelDraftProposer
from taskloom.engine.ngram import NgramProposer
from taskloom.engine.scheduler import Scheduler
from taskloom.lora.manager import LoRAManager
from taskloom.models.draft_heads import DRAFT_HEAD_METHODS, DraftHeads, load_draft_heads
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.loader import load_model
from taskloom.ops.backend import TORCH_OPS
from taskloom.ops.linear import pack_cpu_linears
from taskloom.runtime.cuda_graphs import default_capture_sizes
from taskloom.runtime.memory import kv_cache_bytes, profile_memory
from taskloom.runtime.dtypes import torch_dtype
from taskloom.runtime.model_runner import ModelRunner
from taskloom.tokenizer.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def num_kv_blocks(config: EngineConfig, model: LlamaForCausalLM, max_model_len: int,
                  graph_sizes: tuple[int, ...]) -> int:
    """How many KV blocks the pool gets: `num_blocks` if set, else what the memory budget
    holds: `kv_cache_memory_gb` on CPU; on GPU, `gpu_memory_utilization` of the device less
    the weights, a profiled step's peak and the CUDA-graph reserve."""
    cache, arch = config.cache, model.config
    if cache.num_blocks is not None:
        return cache.num_blocks
    device = torch.device(config.model.device)
    if device.type == "cuda":
        profile = profile_memory(model, arch, config.scheduler, max_model_len,
                                 cache.block_size, device)
        budget: float = kv_cache_bytes(profile, cache.gpu_memory_utilization, graph_sizes)
    else:
        budget = cache.kv_cache_memory_gb * 2**30
    itemsize = torch_dtype(config.model.dtype).itemsize
    block_bytes = cache.block_size * arch.kv_bytes_per_token(itemsize)
    blocks = int(budget // block_bytes)
    if blocks < 1:
        raise ValueError(f"the KV-cache memory budget ({budget / 2**30:.3f} GiB) holds no "
                         f"block of {block_bytes} bytes; give the cache more memory")
    return blocks


def cuda_graph_sizes(config: EngineConfig, model: LlamaForCausalLM) -> tuple[int, ...]:
    """Batch sizes to capture decode CUDA graphs for: none on the CPU, with `enforce_eager`,
    or when the model runs the torch reference ops (their attention plans on host copies of
    the metadata); else `cuda_graph_sizes`, or buckets up to `max_num_seqs` (with
    speculative decoding, up to `max_num_seqs` decodes of 1 + num_speculative_tokens tokens
    each: a step of decodes with drafts replays a graph of one row per token)."""
    if torch.device(config.model.device).type != "cuda" or config.model.enforce_eager:
        return ()
    if model.ops is TORCH_OPS:
        logger.warning("no CUDA graphs: the model runs the torch reference ops, whose "
                       "attention reads the step from the host; every step runs eagerly")
        return ()
    sizes = config.model.cuda_graph_sizes
    if sizes:
        return tuple(sorted(set(sizes)))
    rows = config.scheduler.max_num_seqs
    spec = config.speculative
    if spec is not None:    # a drafted request's step is a row a token (a tree's: a node)
        tree = spec.token_tree
        drafts = spec.num_speculative_tokens if tree is None else tree.num_nodes
        rows = min(rows * (1 + drafts), config.scheduler.max_num_batched_tokens)
    return default_capture_sizes(rows)


def build_engine(config: EngineConfig) -> EngineCore:
    """Load the model named by `config.model` and return a ready engine core."""
    loaded = load_model(config.model)
    arch = loaded.arch
    tokenizer: Tokenizer | None = None
    if not (config.model.random_weights or config.model.skip_tokenizer_init):
        tokenizer = load_tokenizer(loaded.path)
    eos = tuple(dict.fromkeys((tokenizer.eos_token_ids if tokenizer else ())
                              + arch.eos_token_ids))
    device = torch.device(config.model.device)
    dtype = torch_dtype(config.model.dtype)
    max_model_len = config.model.max_model_len or arch.max_position_embeddings
    pack_cpu_linears(loaded.model)     # bf16/fp16 on a CPU: weights reordered once for oneDNN
    lora = None
    if config.lora.enabled:     # before sizing the KV pool: the slots take device memory
        lora = LoRAManager(loaded.model, arch, config.lora, loaded.model.ops, device)
    # draft heads take device memory too; they are checked before the pool is sized
    drafter = _load_drafter(config.speculative, loaded.model, dtype, device)
    graph_sizes = cuda_graph_sizes(config, loaded.model)
    num_blocks = num_kv_blocks(config, loaded.model, max_model_len, graph_sizes)
    logger.info("KV cache: %d blocks of %d tokens (%d tokens), max_model_len %d", num_blocks,
                config.cache.block_size, num_blocks * config.cache.block_size, max_model_len)
    window = resolve_window(config.cache, arch.sliding_window, max_model_len)
    if window is not None:
        logger.info("sliding window of %d tokens, %d attention sinks", window.size,
                    window.num_sink_tokens)
    tree = None if config.speculative is None else config.speculative.token_tree
    runner = ModelRunner(loaded.model, arch, num_blocks, config.cache.block_size, dtype,
                         device, eos, max_model_len, graph_sizes, lora,
                         config.model.shared_prefix_attention, window, drafter,
                         config.cache.snapkv, tree,
                         cpu_graphs=device.type == "cpu" and not config.model.enforce_eager)
    kv = KVCacheManager(num_blocks, config.cache.block_size,
                        config.cache.enable_prefix_caching, window, config.cache.snapkv)
    if config.cache.snapkv is not None:
        s = config.cache.snapkv
        logger.info("SnapKV: prompts of more than %d tokens keep %d entries a KV head "
                    "(window %d, %s pooling of %d)", s.budget, s.budget, s.window_size,
                    s.pooling, s.kernel_size)
    spec = config.speculative
    proposer = (None if spec is None else ModelDraftProposer(spec) if drafter is not None
                else NgramProposer(spec))
    scheduler = Scheduler(config.scheduler, kv, max_model_len,
                          config.lora.max_loras if config.lora.enabled else 0, proposer)
    int4 = " with 4-bit GGUF projections" if config.model.quantization == "gguf" else ""
    return EngineCore(scheduler, runner, tokenizer, arch.vocab_size, eos,
                      runs_on=f"{config.model.dtype} on {device}{int4}")


def _load_drafter(spec: SpeculativeConfig | None, model: LlamaForCausalLM, dtype: torch.dtype,
                  device: torch.device) -> DraftHeads | None:
    """The draft heads (Medusa's or Hydra's) `spec` names, checked against the model and
    the draft count."""
    if spec is None or spec.method not in DRAFT_HEAD_METHODS:
        return None
    assert spec.model is not None
    heads = load_draft_heads(spec.method, spec.model, model.config,
                             model.model.embed_tokens.weight, model.lm_head_weight(), dtype,
                             device)
    name = spec.method.capitalize()
    if spec.num_speculative_tokens > heads.num_heads:
        raise ValueError(f"num_speculative_tokens {spec.num_speculative_tokens} is more than "
                         f"the {heads.num_heads} heads of the {name} checkpoint {spec.model}")
    logger.info("%s drafts: %d of the %d heads at %s", name, spec.num_speculative_tokens,
                heads.num_heads, spec.model)
    return heads
