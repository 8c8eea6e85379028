"""GGUF checkpoints: architecture from metadata, tensors dequantized and renamed to HF names.

Reading and dequantization are the `gguf` package's (`GGUFReader`, `gguf.quants.dequantize`);
this module only maps llama.cpp's names and conventions onto Hugging Face's:
- tensor names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...);
- llama.cpp's converter permutes the q/k projections of `llama`-architecture models (Llama,
  Mistral) for its interleaved rope; `unpermute_qk` undoes it for our rotate-half rope
  (qwen2/qwen3 GGUFs are not permuted);
- Llama-3 rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors, which
  becomes `ArchConfig.rope_freq_factors`.

Decoder projections stored 4-bit (Q4_0, Q4_1, Q4_K) can instead be read as such
(`int4_projections`, `weights(..., int4=...)`: `taskloom.models.gguf_int4`) for a model that
keeps them 4-bit, and an lm head stored Q8_0 as such too (`q8_head`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from taskloom.models.arch import ArchConfig
from taskloom.models.gguf_int4 import INT4_GGUF_TYPES, split_int4_blocks, split_q8_0_blocks
from taskloom.models.gguf_reader import open_gguf
from taskloom.models.llama import param_name
from taskloom.ops.int4_linear import INT4_ROWS_MULTIPLE, Int4Weight
from taskloom.ops.small_linear import Q8Weight

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPPORTED_QUANT_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3")
_PERMUTED_ARCHS = ("llama",)
ROPE_FREQS = "rope_freqs.weight"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_PROJECTION_RE = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")
_REQUIRED = object()
DEQUANT_CHUNK_BYTES = 1 << 20


def gguf_to_hf_name(name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when it has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.match(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of a q or k projection (weight [heads*head_dim, in] or
    bias [heads*head_dim]); `num_heads` is the number of heads of that projection."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # [heads, head_dim/2, 2, ...]
    return w.transpose(1, 2).reshape(weight.shape)             # [heads*head_dim, ...]


def dequantize_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as float32 torch, in HF (row-major, [out, in]) layout."""
    if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
        raise ValueError(_unsupported_message(tensor))
    shape = tuple(int(d) for d in reversed(tensor.shape))     # GGUF lists dims innermost first
    # A plain ndarray view of the memmap: numpy's memmap subclass slows every block slice.
    raw = np.asarray(tensor.data)
    data = np.asarray(_dequantize(raw, tensor.tensor_type), dtype=np.float32)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"tensor {tensor.name!r}: expected {int(np.prod(shape))} values for shape {shape}, "
            f"got {data.size}")
    if not data.flags.writeable:
        data = data.copy()
    return torch.from_numpy(data.reshape(shape))


def _dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`gguf.quants.dequantize`, over ~1 MiB of rows at a time: gguf applies its block
    arithmetic to 16 rows at a time, and numpy's cost per call over thousands of such groups
    is about half of the embedded model's ~1 s of dequantization. Blocks are independent, so
    the values are gguf's, bit for bit; where gguf's per-type classes are not where this
    looks (they are private), or the tensor is empty, its own `dequantize` runs."""
    traits = getattr(gguf.quants, "_type_traits", {}).get(qtype)
    if traits is None or not hasattr(traits, "dequantize_rows") or not raw.size:
        return dequantize(raw, qtype)
    traits.init_grid()
    rows = raw.reshape(-1, raw.shape[-1])
    step = max(1, DEQUANT_CHUNK_BYTES // max(1, rows.shape[1]))
    return np.concatenate([traits.dequantize_rows(rows[i:i + step])
                           for i in range(0, rows.shape[0], step)])


def _unsupported_message(tensor: ReaderTensor) -> str:
    supported = ", ".join(t.name for t in SUPPORTED_QUANT_TYPES)
    return (f"tensor {tensor.name!r} has unsupported GGUF quantization type "
            f"{tensor.tensor_type.name}; taskloom supports {supported}")


class GGUFCheckpoint:
    """One GGUF file opened for reading (memory-mapped by the `gguf` reader)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = open_gguf(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        bad = [t for t in self.reader.tensors if t.tensor_type not in SUPPORTED_QUANT_TYPES]
        if bad:
            raise ValueError(f"{path}: {_unsupported_message(bad[0])}")
        arch = self.field("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHS:
            raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; taskloom runs "
                             f"{', '.join(SUPPORTED_GGUF_ARCHS)}")
        self.arch_name: str = arch

    def field(self, key: str, default: Any = _REQUIRED) -> Any:
        """A metadata value; a clear error when a required key is absent."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    def arch_config(self) -> ArchConfig:
        """ArchConfig from the `{arch}.*` hyper-parameters and `tokenizer.ggml.*` ids."""
        p = self.arch_name + "."
        hidden = int(self.field(p + "embedding_length"))
        heads = int(self.field(p + "attention.head_count"))
        kv_heads = _one_value(self.field(p + "attention.head_count_kv", heads),
                              p + "attention.head_count_kv")
        head_dim = int(self.field(p + "attention.key_length", hidden // heads))
        self._check_rope(head_dim)
        return ArchConfig(
            model_type=self.arch_name,
            vocab_size=self._vocab_size(),
            hidden_size=hidden,
            intermediate_size=int(self.field(p + "feed_forward_length")),
            num_hidden_layers=int(self.field(p + "block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(self.field(p + "context_length")),
            rms_norm_eps=float(self.field(p + "attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.field(p + "rope.freq_base", 10000.0)),
            rope_freq_factors=self._rope_freq_factors(),
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=self._eos_token_ids(),
        )

    def _check_rope(self, head_dim: int) -> None:
        p = self.arch_name + "."
        value_dim = int(self.field(p + "attention.value_length", head_dim))
        rope_dim = int(self.field(p + "rope.dimension_count", head_dim))
        if value_dim != head_dim or rope_dim != head_dim:
            raise ValueError(
                f"{self.path}: key, value and rope dimensions must be equal, got key_length "
                f"{head_dim}, value_length {value_dim}, rope.dimension_count {rope_dim}")
        scaling = self.field(p + "rope.scaling.type", "none")
        if scaling != "none":
            raise ValueError(f"{self.path}: unsupported rope scaling type {scaling!r}; GGUF "
                             f"files store Llama-3 scaling as a {ROPE_FREQS} tensor")

    def _vocab_size(self) -> int:
        """The token list's length, checked against the embedding; where they differ (an
        embedding padded past the tokenizer) the embedding's rows win, as the weights must fit."""
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise ValueError(f"{self.path}: no token_embd.weight tensor")
        rows = int(embed.shape[-1])                          # GGUF dims: [hidden, vocab]
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) != rows:
            logger.warning("%s: %d tokens in the token list but token_embd has %d rows; "
                           "vocab_size %d", self.path, len(tokens.data), rows, rows)
        return rows

    def _rope_freq_factors(self) -> tuple[float, ...] | None:
        if ROPE_FREQS not in self.tensors:
            return None
        return tuple(float(f) for f in dequantize_tensor(self.tensors[ROPE_FREQS]).tolist())

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = [self.field(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
        return tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    def int4_projections(self) -> set[str]:
        """The decoder projections, named as the model holds them (fused: `model.layers.0.
        self_attn.qkv_proj`), whose every weight is stored 4-bit (Q4_0, Q4_1, Q4_K) and
        whose rows torch's int4 packing takes."""
        kinds: dict[str, list[bool]] = {}
        rows: dict[str, int] = {}
        for tensor in self.reader.tensors:
            name = gguf_to_hf_name(tensor.name)
            module = None if name is None else _module_of(name)
            if module is not None and _PROJECTION_RE.match(module):
                kinds.setdefault(module, []).append(tensor.tensor_type in INT4_GGUF_TYPES)
                rows[module] = rows.get(module, 0) + int(tensor.shape[-1])
        return {m for m, k in kinds.items() if all(k) and rows[m] % INT4_ROWS_MULTIPLE == 0}

    def q8_head(self) -> Q8Weight | None:
        """The lm head's weight [vocab, hidden] as stored, where it is Q8_0 (`output.weight`,
        or the token embedding when the two are tied), else None."""
        tensor = self.tensors.get("output.weight")
        if tensor is None:
            tensor = self.tensors.get("token_embd.weight")
        if tensor is None or tensor.tensor_type != Q.Q8_0:
            return None
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return split_q8_0_blocks(np.asarray(tensor.data), shape)

    def weights(self, arch: ArchConfig, int4: set[str] = frozenset()
                ) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
        """Every weight as (HF name, float32 tensor in HF layout), one tensor at a time; the
        weights of the projections named in `int4` (see `int4_projections`) as Int4Weight."""
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                continue                                     # folded into arch.rope_freq_factors
            name = gguf_to_hf_name(tensor.name)
            if name is None:
                raise ValueError(f"{self.path}: unexpected GGUF tensor {tensor.name!r} for "
                                 f"architecture {self.arch_name}")
            weight: torch.Tensor | Int4Weight
            if _module_of(name) in int4:
                shape = tuple(int(d) for d in reversed(tensor.shape))
                weight = split_int4_blocks(np.asarray(tensor.data), tensor.tensor_type, shape)
                yield name, weight.map_rows(lambda t, n=name: self._unpermuted(t, n, arch))
            else:
                yield name, self._unpermuted(dequantize_tensor(tensor), name, arch)

    def _unpermuted(self, weight: torch.Tensor, name: str, arch: ArchConfig) -> torch.Tensor:
        """`weight` (rows first) in our rope's order: llama.cpp's q/k permute undone."""
        if self.arch_name not in _PERMUTED_ARCHS:
            return weight
        if ".self_attn.q_proj." in name:
            return unpermute_qk(weight, arch.num_attention_heads)
        if ".self_attn.k_proj." in name:
            return unpermute_qk(weight, arch.num_key_value_heads)
        return weight


def _module_of(hf_name: str) -> str | None:
    """The model's module holding a weight (`...q_proj.weight` -> `...qkv_proj`: fused as
    the model holds it); None for a bias."""
    name = param_name(hf_name)[0]
    return name.removesuffix(".weight") if name.endswith(".weight") else None


def _one_value(value: Any, key: str) -> int:
    """A per-layer list of equal values (some converters write one per layer) or a scalar."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{key} differs between layers ({sorted(set(value))}); "
                             f"taskloom needs one value for all layers")
        return int(value[0])
    return int(value)
