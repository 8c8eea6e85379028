"""LLM: the offline entry point. Generate for a list of prompts or chat conversations in one
continuous batch, or stream one request token by token."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from taskloom.config import (CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig,
                             SnapKVConfig, SpeculativeConfig)
from taskloom.engine.core import EngineCore
from taskloom.engine.prefix_order import prefix_grouped_order
from taskloom.lora.registry import LoRARegistry
from taskloom.lora.request import LoRARequest
from taskloom.outputs import OutputKind, RequestOutput
from taskloom.runtime.builder import build_engine
from taskloom.runtime.dtypes import resolve_dtype
from taskloom.sampling_params import SamplingParams
from taskloom.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]
Conversation = list[dict]
Adapter = str | LoRARequest | None


def speculative_config_from(fields: Mapping[str, object]) -> SpeculativeConfig:
    """A SpeculativeConfig from vLLM-style keys; ValueError naming an unknown key."""
    known = set(SpeculativeConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown speculative_config keys {', '.join(unknown)}; expected "
                         f"some of {', '.join(sorted(known))}")
    return SpeculativeConfig(**fields)  # type: ignore[arg-type]


class LLM:
    """A model loaded with its engine, for offline generation.

    `model` is a Hugging Face directory, a .gguf file, or None for the embedded
    SmolLM2-135M-Instruct. With `random_weights=True`, `model` names a shape
    (e.g. "llama-3.1-8b") or a config.json, and prompts must be token ids. On CUDA,
    decode steps replay CUDA graphs (batch sizes `cuda_graph_sizes`, default buckets up to
    `max_num_seqs`) unless `enforce_eager`. `generate` and `chat` on a list admit the prompts
    grouped by shared prefix (`prefix_aware_order`), so each group's prefix is computed once
    and stays cached while the group runs; outputs still come back in input order. With
    `async_scheduling`, each step is scheduled while the previous one runs on the device.
    With `speculative_config` (a SpeculativeConfig, or its fields as a dict, as vLLM's
    `speculative_config`), decoding requests also run draft tokens found by prompt lookup and
    keep those the model agrees with: the same outputs, in fewer steps when text repeats.
    With `sliding_window` (KV compression; default: the model's own window, as Mistral
    v0.1's), each token attends to the last `sliding_window` positions and to the first
    `num_sink_tokens` (attention sinks), and a request holds about that much KV however
    long it grows. With `snapkv` (KV compression of long prompts: a SnapKVConfig, its
    fields as a dict, or just its budget), a prompt longer than the budget keeps, in each
    layer and KV head, only the budget's worth of positions its last tokens attended to
    most, and its request holds that much prompt KV. With `quantization="gguf"` (a GGUF
    file, `dtype="bfloat16"` on a CPU), its 4-bit projections (Q4_0, Q4_1, Q4_K) stay 4-bit:
    a quarter of the memory, faster decoding of one or a few streams, slower of many.

    LoRA adapters (PEFT directories) are served when `loras` names some ({name: path}) or
    `enable_lora` is set: up to `max_loras` of them in one batch, ranks up to `max_lora_rank`,
    `max_cpu_loras` kept in host memory. Load more with `load_lora`, mix loaded ones with
    `merge_loras`, and pick one per prompt with `generate(..., lora=...)`.
    """

    def __init__(self, model: str | None = None, *, dtype: str = "float32", device: str = "cpu",
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 kv_cache_memory_gb: float = 1.0, block_size: int = 16,
                 num_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, random_weights: bool = False,
                 skip_tokenizer_init: bool = False,
                 seed: int = 0, enforce_eager: bool = False,
                 cuda_graph_sizes: Sequence[int] | None = None,
                 enable_prefix_caching: bool = True, prefix_aware_order: bool = True,
                 async_scheduling: bool = False, shared_prefix_attention: bool = True,
                 enable_lora: bool = False, loras: Mapping[str, str] | None = None,
                 max_loras: int = 8, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None,
                 speculative_config: SpeculativeConfig | Mapping[str, object] | None = None,
                 sliding_window: int | None = None, num_sink_tokens: int = 0,
                 snapkv: SnapKVConfig | Mapping[str, object] | int | None = None,
                 quantization: str | None = None) -> None:
        dtype = resolve_dtype(dtype, device)    # "auto" resolved, the device checked
        if isinstance(speculative_config, Mapping):
            speculative_config = speculative_config_from(speculative_config)
        if isinstance(snapkv, Mapping):
            snapkv = SnapKVConfig(**snapkv)     # type: ignore[arg-type]
        elif isinstance(snapkv, int):
            snapkv = SnapKVConfig(snapkv)
        self.config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, device=device,
                              random_weights=random_weights, seed=seed,
                              skip_tokenizer_init=skip_tokenizer_init,
                              max_model_len=max_model_len, enforce_eager=enforce_eager,
                              cuda_graph_sizes=(None if cuda_graph_sizes is None
                                                else tuple(cuda_graph_sizes)),
                              shared_prefix_attention=shared_prefix_attention,
                              quantization=quantization),
            cache=CacheConfig(block_size=block_size, kv_cache_memory_gb=kv_cache_memory_gb,
                              gpu_memory_utilization=gpu_memory_utilization,
                              num_blocks=num_blocks,
                              enable_prefix_caching=enable_prefix_caching,
                              sliding_window=sliding_window, num_sink_tokens=num_sink_tokens,
                              snapkv=snapkv),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      async_scheduling=async_scheduling),
            lora=LoRAConfig(enabled=enable_lora or bool(loras), max_loras=max_loras,
                            max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras),
            speculative=speculative_config)
        self.engine: EngineCore = build_engine(self.config)
        self.prefix_aware_order = prefix_aware_order
        self._ids = itertools.count()
        self.loras = LoRARegistry()
        for name, path in (loras or {}).items():
            self.load_lora(name, path)

    def load_lora(self, name: str, path: str) -> LoRARequest:
        """Load the PEFT adapter at `path` under `name` (ValueError if it does not fit)."""
        return self._load(self.loras.reserve(name, path))

    def unload_lora(self, name: str) -> None:
        """Forget an adapter and the merges made from it (KeyError if unknown)."""
        for lora_id in self.loras.remove(name):
            self.engine.remove_lora(lora_id)

    def merge_loras(self, weights: Mapping[str, float], method: str = "linear",
                    density: float = 1.0, majority_sign_method: str = "total",
                    seed: int = 0) -> LoRARequest:
        """A composite of loaded adapters (`{name: weight}`), merged by `linear` (task
        arithmetic), `ties` or `dare_linear` as PEFT's `add_weighted_adapter` does; pass it
        as `lora=` like a name. ValueError if they cannot be merged (e.g. different ranks)."""
        lora, new = self.loras.merged(weights, method, density, majority_sign_method, seed)
        return self._load(lora) if new else lora

    def _load(self, lora: LoRARequest) -> LoRARequest:
        """Load a newly named adapter or merge into the engine; forget its name if that fails."""
        try:
            self.engine.add_lora(lora)
        except BaseException:
            self.loras.discard(lora)
            raise
        return lora

    @property
    def tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError("this model has no tokenizer (random weights): use token ids")
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora: Adapter | Sequence[Adapter] = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids), with adapter `lora` (a loaded adapter's
        name, a `merge_loras` result, or one per prompt); outputs come back in input order. A
        prompt that could not be served (its adapter's files are gone since it was loaded)
        comes back with `error` set and finish_reason "error"; the others are unaffected."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        encoded = [self._encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run(encoded, texts, sampling_params, use_tqdm, lora)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             lora: Adapter | Sequence[Adapter] = None,
             tools: list[dict[str, Any]] | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Answer one conversation or a list of them, rendered with the model's chat template
        (which shows the model `tools`, OpenAI-style function definitions, if given). With
        `continue_final_message` (and `add_generation_prompt=False`) the model continues
        each conversation's last message, an assistant reply's prefill."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        encoded = [self.encode_chat(c, add_generation_prompt, tools, continue_final_message)
                   for c in convs]
        return self._run(encoded, [None] * len(convs), sampling_params, use_tqdm, lora)

    def encode_chat(self, messages: Conversation, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None,
                    continue_final_message: bool = False) -> list[int]:
        """Token ids of a conversation rendered with the chat template (the template itself
        places BOS where the model wants it, so no special tokens are added)."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt, tools,
                                          continue_final_message)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               lora: Adapter = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it (see `text_delta`).
        Closing the iterator early aborts the request."""
        params = sampling_params or SamplingParams()
        rid = self._add(self._encode(prompt), prompt if isinstance(prompt, str) else None,
                        params, self._lora(lora))
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)

    # ----- internals ---------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        return prompt

    def _add(self, ids: list[int], text: str | None, params: SamplingParams,
             lora: LoRARequest | None = None,
             output_kind: OutputKind = OutputKind.CUMULATIVE) -> str:
        rid = str(next(self._ids))
        self.engine.add_request(rid, ids, params, prompt=text, lora=lora,
                                output_kind=output_kind)
        return rid

    def _lora(self, lora: Adapter) -> LoRARequest | None:
        if lora is None or isinstance(lora, LoRARequest):
            return lora
        try:
            return self.loras.resolve(lora)
        except KeyError as e:
            raise ValueError(e.args[0]) from None

    def _loras_list(self, lora: Adapter | Sequence[Adapter], n: int) -> list[LoRARequest | None]:
        if lora is None or isinstance(lora, (str, LoRARequest)):
            return [self._lora(lora)] * n
        if len(lora) != n:
            raise ValueError(f"got {len(lora)} adapters for {n} prompts")
        return [self._lora(a) for a in lora]

    def _run(self, encoded: list[list[int]], texts: list[str | None],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool, lora: Adapter | Sequence[Adapter] = None) -> list[RequestOutput]:
        params = self._params_list(sampling_params, len(encoded))
        loras = self._loras_list(lora, len(encoded))
        groups = [0 if a is None else a.lora_id for a in loras]
        order = prefix_grouped_order(encoded, groups) if self.prefix_aware_order \
            else range(len(encoded))
        rids: dict[int, str] = {}
        try:
            for i in order:
                rids[i] = self._add(encoded[i], texts[i], params[i], loras[i],
                                    OutputKind.FINAL_ONLY)
        except ValueError as e:
            for rid in rids.values():
                self.engine.abort(rid)
            raise ValueError(f"prompt {i}: {e}") from None
        return self._drain([rids[i] for i in range(len(encoded))], use_tqdm and len(rids) > 1)

    @staticmethod
    def _params_list(sp: SamplingParams | Sequence[SamplingParams] | None,
                     n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} sampling params for {n} prompts")
        return list(sp)

    def _drain(self, rids: list[str], show_progress: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(rids)
        with tqdm(total=len(rids), desc="generating", disable=not show_progress,
                  unit="req") as bar:
            try:
                while len(results) < len(rids):
                    for out in self.engine.step():
                        if out.finished and out.request_id in wanted:
                            results[out.request_id] = out
                            bar.update(1)
            except BaseException:
                for rid in wanted - results.keys():
                    self.engine.abort(rid)
                raise
        return [results[r] for r in rids]
