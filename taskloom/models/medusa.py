"""Medusa draft heads (Cai et al., "Medusa", 2024): the model proposes its own drafts.

Head k (k = 1..K) reads the base model's final hidden state at a position p (after the last
norm, where the base's lm_head reads it) and guesses the token at p + 1 + k, one past what the
base predicts: a stack of residual blocks `x = x + SiLU(W x + b)`, then an lm head to the
vocabulary. The top-1 guess of every head is the chain of drafts for the next step, which the
base model verifies as any drafts (taskloom.engine.scheduler), so outputs do not change;
how many of them it accepts is what the heads buy.

Checkpoints are directories with a config.json and safetensors, in either layout:

- vLLM's (`"architectures": ["MedusaModel"]`): config `num_heads`, `num_hidden_layers`,
  `hidden_size`, `vocab_size`, optional `medusa_fc_bias` and `original_lm_head`; tensors
  `blocks.{i}.layers.{j}.weight` (and `.bias`), `lm_heads.{i}.weight`, optionally under a
  `medusa_heads.` prefix. With `original_lm_head`, one lm head (`lm_heads.0.weight`) serves
  every head, and a checkpoint without it means the base model's own lm_head (what
  taskloom's trained heads, taskloom.models.draft_train, write: they train with it frozen).
  With `truncated_vocab_size` N below `vocab_size`, the heads guess among the N tokens of
  the tensor `token_map` only (taskloom.models.draft_vocab).
- FasterDecoding's (the paper's code): config `medusa_num_heads`, `medusa_num_layers`; file
  `medusa_lm_head.safetensors` with `{i}.{j}.linear.weight` / `.bias` for the blocks and
  `{i}.{num_layers}.weight` for head i's lm head.

The blocks of all heads are stacked so that each layer of them is one batched matmul.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from taskloom.engine.draft_tree import TokenTree
from taskloom.models.arch import ArchConfig
from taskloom.models.draft_vocab import TOKEN_MAP, DraftVocab, check_token_map

VLLM_FILE = "model.safetensors"
FASTER_DECODING_FILE = "medusa_lm_head.safetensors"

_VLLM_BLOCK = re.compile(r"^(?:medusa_heads\.)?blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_VLLM_LM = re.compile(r"^(?:medusa_heads\.)?lm_heads\.(\d+)\.weight$")
_FD = re.compile(r"^(\d+)\.(\d+)\.(?:linear\.)?(weight|bias)$")
# The most logits `MedusaHeads.propose` holds at once (64 Mi: 128 MiB in bf16)
PROPOSE_MAX_LOGITS = 1 << 26


@dataclass(frozen=True)
class MedusaConfig:
    """The heads' shape. `num_lm_heads`: K (one per head), 1 (shared), or 0 (the base
    model's lm_head)."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    bias: bool = True
    num_lm_heads: int = 0
    truncated_vocab_size: int | None = None    # the draft vocabulary's size; None: all

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"a Medusa checkpoint needs num_heads >= 1, got {self.num_heads}")
        if self.num_layers < 0:
            raise ValueError(f"Medusa num_layers must be >= 0, got {self.num_layers}")
        if self.num_lm_heads not in (0, 1, self.num_heads):
            raise ValueError(f"a Medusa checkpoint has {self.num_lm_heads} lm heads; expected "
                             f"0, 1 or one per head ({self.num_heads})")


class MedusaHeads(nn.Module):
    """K draft heads over a base model's final hidden states; `propose` gives their top-1
    tokens. `base_lm_head` is the base model's lm head weight [vocab, hidden], used (its rows
    of the draft vocabulary) when the checkpoint carries none. `token_map` [N]: the draft
    vocabulary when `config.truncated_vocab_size` is N."""

    def __init__(self, config: MedusaConfig, base_lm_head: torch.Tensor,
                 dtype: torch.dtype, device: torch.device,
                 token_map: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.vocab = DraftVocab(config.vocab_size, token_map).to(device)
        if self.vocab.size != (config.truncated_vocab_size or config.vocab_size):
            raise ValueError(f"Medusa heads over {config.truncated_vocab_size} tokens need a "
                             f"token_map of as many, got {self.vocab.size}")
        k, n, h = config.num_heads, config.num_layers, config.hidden_size
        self.weight = nn.Parameter(torch.zeros(n, k, h, h, dtype=dtype, device=device),
                                   requires_grad=False)              # [layers, K, out, in]
        self.bias = (nn.Parameter(torch.zeros(n, k, 1, h, dtype=dtype, device=device),
                                  requires_grad=False) if config.bias else None)
        self.lm_heads = (nn.Parameter(torch.empty(config.num_lm_heads, self.vocab.size, h,
                                                  dtype=dtype, device=device),
                                      requires_grad=False)
                         if config.num_lm_heads else None)           # [1 or K, N, hidden]
        # the base's rows of the draft vocabulary [N, hidden], where the heads use them
        self.base_lm_head = (self.vocab.rows(base_lm_head) if not config.num_lm_heads
                             else base_lm_head)
        # propose_tree's gather of each node's head and rank, for the tree it last drafted
        self._tree_index: tuple[tuple[tuple[int, ...], ...], torch.Tensor, torch.Tensor] \
            | None = None

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def hidden(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """The states of the first `num_heads` heads (all by default):
        [n, hidden] -> [num_heads, n, hidden]."""
        k = self.config.num_heads if num_heads is None else num_heads
        x = hidden.unsqueeze(0).expand(k, -1, -1)                        # [k, n, hidden]
        for layer in range(self.config.num_layers):
            w = self.weight[layer, :k].transpose(1, 2)                   # [k, in, out]
            y = (torch.bmm(x, w) if self.bias is None
                 else torch.baddbmm(self.bias[layer, :k], x, w))         # [k, n, hidden]
            x = x + F.silu(y)
        return x

    def lm_weight(self, head: int) -> torch.Tensor:
        """Head `head`'s lm head [N, hidden] (N: the draft vocabulary's size)."""
        if self.lm_heads is None:
            return self.base_lm_head
        return self.lm_heads[head if self.lm_heads.shape[0] > 1 else 0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits of every head over the draft vocabulary: [n, hidden] -> [K, n, N]
        (tests; `propose` never holds them all)."""
        x = self.hidden(hidden)
        return torch.stack([self.head_logits(i, x[i]).float()
                            for i in range(self.config.num_heads)])

    def head_logits(self, head: int, state: torch.Tensor) -> torch.Tensor:
        """Head `head`'s logits over the draft vocabulary: [n, hidden] -> [n, N]."""
        return F.linear(state, self.lm_weight(head))

    def train_states(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every head's state for training: [n, hidden] -> [K, n, hidden]. A Medusa head
        reads no tokens (`tokens`, the true next ones, are there for Hydra's heads)."""
        return self.hidden(hidden)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters training fits: the blocks (the lm heads stay as they are)."""
        return [self.weight] + ([] if self.bias is None else [self.bias])

    def propose(self, hidden: torch.Tensor, next_tokens: torch.Tensor, num_tokens: int
                ) -> torch.Tensor:
        """Each row's drafts from the first `num_tokens` heads: [n, hidden] -> [n, num_tokens]
        int64 (`next_tokens`, what the base sampled from `hidden`, is not read: every Medusa
        head guesses from the hidden state alone)."""
        return self._top(hidden, num_tokens, 1)[:, :, 0]

    def propose_tree(self, hidden: torch.Tensor, next_tokens: torch.Tensor, tree: TokenTree
                     ) -> torch.Tensor:
        """Each row's guess for every node of `tree` [n, num_nodes] int64: the node at path
        (r1, ..., rd) gets head d - 1's guess of rank rd (a Medusa head does not read the
        path before it, so siblings at depth d are that head's top guesses)."""
        key = tree.paths
        if self._tree_index is None or self._tree_index[0] != key:
            heads = torch.tensor([len(p) - 1 for p in key], device=hidden.device)
            ranks = torch.tensor([p[-1] for p in key], device=hidden.device)
            self._tree_index = (key, heads, ranks)
        _, heads, ranks = self._tree_index
        top = max(tree.max_rank(d) for d in range(1, tree.depth + 1)) + 1
        return self._top(hidden, tree.depth, top)[:, heads, ranks]

    def _top(self, hidden: torch.Tensor, num_heads: int, top: int) -> torch.Tensor:
        """The `top` best guesses of each of the first `num_heads` heads, best first:
        [n, hidden] -> [n, num_heads, top] int64. Heads that share one lm head go through
        it in one matmul (its weight read once, which is what a small batch's step pays
        for), unless their logits together would pass PROPOSE_MAX_LOGITS; else one head's
        logits [n, N] at a time."""
        x = self.hidden(hidden, num_heads)                               # [k, n, hidden]
        k, n = x.shape[0], x.shape[1]
        shared = self.lm_heads is None or self.lm_heads.shape[0] == 1
        if shared and k * n * self.vocab.size <= PROPOSE_MAX_LOGITS:
            logits = F.linear(x.reshape(k * n, -1), self.lm_weight(0))   # [k * n, N]
            best = _best(logits, top).view(k, n, top)
        else:
            best = torch.stack([_best(F.linear(x[i], self.lm_weight(i)), top)
                                for i in range(k)])                      # [k, n, top]
        return self.vocab.ids(best.transpose(0, 1))                     # [n, k, top]


def _best(logits: torch.Tensor, top: int) -> torch.Tensor:
    """The indexes of each row's `top` largest logits, largest first (argmax for 1)."""
    if top == 1:
        return logits.argmax(-1, keepdim=True)
    return logits.topk(top, dim=-1).indices


def medusa_config_from(config: dict, arch: ArchConfig, path: str, has_lm_heads: bool = True
                       ) -> MedusaConfig:
    """The heads' shape from a checkpoint's config.json, checked against the base model;
    `has_lm_heads`: whether its weights include any lm head."""
    if "medusa_num_heads" in config:     # FasterDecoding's
        heads, layers = config["medusa_num_heads"], config.get("medusa_num_layers", 1)
        hidden, vocab, bias = arch.hidden_size, arch.vocab_size, True
        lm_heads, truncated = heads, None
    elif "num_heads" in config:          # vLLM's
        heads, layers = config["num_heads"], config.get("num_hidden_layers", 1)
        hidden = config.get("hidden_size", arch.hidden_size)
        vocab = config.get("vocab_size", arch.vocab_size)
        bias = bool(config.get("medusa_fc_bias", False))
        shared = bool(config.get("original_lm_head"))
        lm_heads = heads if not shared else 1 if has_lm_heads else 0
        truncated = config.get("truncated_vocab_size")
        truncated = None if truncated is None or truncated == vocab else int(truncated)
    else:
        raise ValueError(f"{path}/config.json is not a Medusa config: expected "
                         "'num_heads' (vLLM's layout) or 'medusa_num_heads' (FasterDecoding's)")
    if hidden != arch.hidden_size or vocab != arch.vocab_size:
        raise ValueError(f"{path}: Medusa heads of hidden size {hidden} and vocabulary {vocab} "
                         f"do not fit the model (hidden size {arch.hidden_size}, vocabulary "
                         f"{arch.vocab_size})")
    return MedusaConfig(int(heads), int(layers), hidden, vocab, bias, lm_heads, truncated)


def _tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(path, framework="pt") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name)


def _place(heads: MedusaHeads, name: str, tensor: torch.Tensor, fd_layout: bool
           ) -> tuple[str, int, int] | None:
    """Copy one checkpoint tensor into the stacked parameters; its (kind, head, layer), or
    None for a name this layout does not have."""
    cfg = heads.config
    m = (_FD if fd_layout else _VLLM_BLOCK).match(name)
    if m:
        head, layer, kind = int(m[1]), int(m[2]), m[3]
        if fd_layout and layer == cfg.num_layers and kind == "weight":     # head's lm head
            kind, layer = "lm_head", 0
    else:
        m = None if fd_layout else _VLLM_LM.match(name)
        if m is None:
            return None
        head, layer, kind = int(m[1]), 0, "lm_head"
    if head >= cfg.num_heads or layer >= max(cfg.num_layers, 1):
        return None
    if kind == "lm_head":
        if heads.lm_heads is None or head >= heads.lm_heads.shape[0]:
            return None
        dst = heads.lm_heads[head]
    elif kind == "weight":
        dst = heads.weight[layer, head]
    else:
        if heads.bias is None:
            return None
        dst = heads.bias[layer, head, 0]
    if tuple(tensor.shape) != tuple(dst.shape):
        raise ValueError(f"Medusa tensor {name} has shape {tuple(tensor.shape)}, expected "
                         f"{tuple(dst.shape)}")
    dst.copy_(tensor)
    return kind, head, layer


def load_medusa(path: str, arch: ArchConfig, base_lm_head: torch.Tensor, dtype: torch.dtype,
                device: torch.device) -> MedusaHeads:
    """Medusa heads from a checkpoint directory (either layout) for a base model of `arch`;
    ValueError on anything missing, unexpected or misshapen."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"Medusa heads: {path} has no config.json")
    fd_layout = os.path.isfile(os.path.join(path, FASTER_DECODING_FILE))
    weights = os.path.join(path, FASTER_DECODING_FILE if fd_layout else VLLM_FILE)
    if not os.path.isfile(weights):
        raise ValueError(f"Medusa heads: {path} has no {VLLM_FILE} or {FASTER_DECODING_FILE}")
    with safe_open(weights, framework="pt") as handle:
        names = set(handle.keys())
        has_lm_heads = any(_VLLM_LM.match(name) for name in names)
        token_map = handle.get_tensor(TOKEN_MAP) if TOKEN_MAP in names else None
    with open(config_path, encoding="utf-8") as f:
        cfg = medusa_config_from(json.load(f), arch, path, has_lm_heads)
    check_token_map("Medusa", path, cfg.truncated_vocab_size, token_map)
    heads = MedusaHeads(cfg, base_lm_head, dtype, device, token_map)
    seen: set[tuple[str, int, int]] = set()
    with torch.no_grad():
        for name, tensor in _tensors(weights):
            if name == TOKEN_MAP:
                continue
            placed = _place(heads, name, tensor, fd_layout)
            if placed is None:
                raise ValueError(f"Medusa heads: unexpected tensor {name!r} in {weights}")
            seen.add(placed)
    want = {("weight", h, n) for h in range(cfg.num_heads) for n in range(cfg.num_layers)}
    if cfg.bias:
        want |= {("bias", h, n) for h in range(cfg.num_heads) for n in range(cfg.num_layers)}
    want |= {("lm_head", h, 0) for h in range(cfg.num_lm_heads)}
    if missing := sorted(want - seen):
        kind, head, layer = missing[0]
        raise ValueError(f"Medusa heads: {weights} lacks {len(missing)} tensors, e.g. head "
                         f"{head}'s {kind} of layer {layer}")
    return heads


def save_medusa(heads: MedusaHeads, path: str) -> None:
    """Write heads in vLLM's layout (their lm heads only if they have their own)."""
    cfg = heads.config
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for head in range(cfg.num_heads):
            prefix = f"blocks.{head}.layers.{layer}"
            tensors[f"{prefix}.weight"] = heads.weight[layer, head].detach().contiguous()
            if heads.bias is not None:
                tensors[f"{prefix}.bias"] = heads.bias[layer, head, 0].detach().contiguous()
    if heads.lm_heads is not None:
        for i in range(heads.lm_heads.shape[0]):
            tensors[f"lm_heads.{i}.weight"] = heads.lm_heads[i].detach().contiguous()
    if heads.vocab.token_map is not None:
        tensors[TOKEN_MAP] = heads.vocab.token_map
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(path, VLLM_FILE))
    config = {"architectures": ["MedusaModel"], "model_type": "medusa",
              "num_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
              "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "medusa_fc_bias": cfg.bias,
              "original_lm_head": cfg.num_lm_heads != cfg.num_heads}
    if cfg.truncated_vocab_size is not None:
        config["truncated_vocab_size"] = cfg.truncated_vocab_size
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
