"""Hydra draft heads (Ankner et al., "Hydra: Sequentially-Dependent Draft Heads for Medusa
Decoding", 2024): Medusa heads that also read the tokens drafted before theirs.

A Medusa head guesses the token k + 1 places ahead from the base model's hidden state alone,
blind to what the heads before it guessed. A Hydra head also reads the tokens in between: at a
position p whose hidden state h_p the base model turned into the token x1 (the token the step
sampled), head i (i = 0..K-1) reads

    [h_p, E(x1), E(d1), ..., E(di)]         E: the base model's input embedding

(d1..di: the drafts of heads 0..i-1) and guesses d(i+1), the token at p + 2 + i. Its first
residual block maps that (i + 2) * hidden input down: `res(x) + SiLU(lin(x))`, both linear
with a bias; further blocks are Medusa's `x + SiLU(W x + b)`; then an lm head. Drafting is
so a chain of K small steps, each reading the guess before it, which is what makes the
later heads' guesses more often right than Medusa's.

Checkpoints are directories with Hydra's config.json (`hydra_num_heads`, `hydra_num_layers`,
`hydra_head_arch` "mlp", `grounded_heads` true, `hidden_state_offset` 0) and the head's
state dict as the paper's code saves it (`hydra_lm_head.pt`) or in safetensors
(`model.safetensors`, what taskloom writes), tensors named as in that code:
`hydra_mlp.{i}.0.linear.*` and `hydra_mlp.{i}.0.res_connection.*` (the first block),
`hydra_mlp.{i}.{j}.linear.*` (j >= 1), `hydra_lm_head.{i}.weight` and `.bias`. Heads trained
by taskloom (taskloom.models.draft_train) carry no lm head and say so with
`"use_base_lm_head": true`: they read the base model's own, frozen. With
`truncated_vocab_size` N (vLLM's key for Medusa heads), the heads guess among the N tokens of
the tensor `token_map` only (taskloom.models.draft_vocab). Hydra++'s prefix-attention and
cross-attention heads are other architectures, refused by name.
"""
from __future__ import annotations

import json
import os
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

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "hydra_lm_head.pt"


@dataclass(frozen=True)
class HydraConfig:
    """The heads' shape. `own_lm_heads`: one lm head (with a bias) per head, as Hydra's code
    trains them; else the base model's lm head serves every head."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    own_lm_heads: bool = False
    truncated_vocab_size: int | None = None    # the draft vocabulary's size; None: all

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"Hydra heads need num_heads >= 1, got {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"Hydra heads need num_layers >= 1 (the first block reads the "
                             f"drafted tokens), got {self.num_layers}")


class HydraHeads(nn.Module):
    """K sequentially dependent heads over a base model's final hidden states and its input
    embedding `embed` [vocab, hidden]; `propose` drafts a chain of their top-1 tokens.
    `base_lm_head` [vocab, hidden] serves heads without their own (its rows of the draft
    vocabulary). `token_map` [N]: the draft vocabulary when `config.truncated_vocab_size`
    is N."""

    def __init__(self, config: HydraConfig, embed: torch.Tensor, base_lm_head: torch.Tensor,
                 dtype: torch.dtype, device: torch.device,
                 token_map: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.vocab = DraftVocab(config.vocab_size, token_map).to(device)
        if self.vocab.size != (config.truncated_vocab_size or config.vocab_size):
            raise ValueError(f"Hydra heads over {config.truncated_vocab_size} tokens need a "
                             f"token_map of as many, got {self.vocab.size}")
        k, n, h, v = config.num_heads, config.num_layers, config.hidden_size, self.vocab.size

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device),
                                requires_grad=False)

        # head i's first block: rows [:h] res_connection, rows [h:] linear (one matmul)
        self.first_weight = nn.ParameterList([zeros(2 * h, (i + 2) * h) for i in range(k)])
        self.first_bias = nn.ParameterList([zeros(2 * h) for _ in range(k)])
        self.weight = zeros(k, n - 1, h, h)                          # [K, layers - 1, out, in]
        self.bias = zeros(k, n - 1, h)
        self.lm_weight = zeros(k, v, h) if config.own_lm_heads else None   # [K, N, hidden]
        self.lm_bias = zeros(k, v) if config.own_lm_heads else None
        self.embed = embed
        # the base's rows of the draft vocabulary [N, hidden], where the heads use them
        self.base_lm_head = (base_lm_head if config.own_lm_heads
                             else self.vocab.rows(base_lm_head))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def head_state(self, head: int, inputs: torch.Tensor) -> torch.Tensor:
        """Head `head`'s state from its input [n, (head + 2) * hidden] -> [n, hidden]."""
        h = self.config.hidden_size
        y = F.linear(inputs, self.first_weight[head], self.first_bias[head])  # [n, 2 * hidden]
        x = y[:, :h] + F.silu(y[:, h:])
        for layer in range(self.config.num_layers - 1):
            x = x + F.silu(F.linear(x, self.weight[head, layer], self.bias[head, layer]))
        return x

    def head_logits(self, head: int, state: torch.Tensor) -> torch.Tensor:
        """Head `head`'s logits over the draft vocabulary: [n, hidden] -> [n, N]."""
        if self.lm_weight is None:
            return F.linear(state, self.base_lm_head)
        assert self.lm_bias is not None
        return F.linear(state, self.lm_weight[head], self.lm_bias[head])

    def train_states(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every head's state, teacher-forced: the tokens each head reads are the true ones,
        tokens[:, j] the token at p + 1 + j. [n, hidden], [n, K] -> [K, n, hidden]."""
        embeds = self.embed[tokens.clamp(min=0)].to(hidden.dtype)       # [n, K, hidden]
        ctx = torch.cat([hidden.unsqueeze(1), embeds], dim=1)           # [n, K + 1, hidden]
        return torch.stack([self.head_state(i, ctx[:, :i + 2].flatten(1))
                            for i in range(self.config.num_heads)])

    def propose(self, hidden: torch.Tensor, next_tokens: torch.Tensor, num_tokens: int
                ) -> torch.Tensor:
        """Each row's chain of drafts from the first `num_tokens` heads, each head reading
        the drafts before its own: hidden [n, hidden] (the base's state at the position that
        sampled `next_tokens` [n]) -> [n, num_tokens] int64."""
        ctx = [hidden, self.embed[next_tokens].to(hidden.dtype)]
        drafts = []
        for i in range(num_tokens):
            state = self.head_state(i, torch.cat(ctx, dim=-1))           # [n, hidden]
            token = self.vocab.ids(self.head_logits(i, state).argmax(-1))   # [n]
            drafts.append(token)
            ctx.append(self.embed[token].to(hidden.dtype))
        return torch.stack(drafts, dim=1)                               # [n, num_tokens]

    def propose_tree(self, hidden: torch.Tensor, next_tokens: torch.Tensor, tree: TokenTree
                     ) -> torch.Tensor:
        """Each row's guess for every node of `tree` [n, num_nodes] int64, a depth at a
        time: head d - 1 reads each depth-(d - 1) node's path (the sampled token, then the
        guesses from the root down to that node), all such nodes of all rows in one batch,
        and their children get that head's guesses of their ranks."""
        index = {p: i for i, p in enumerate(tree.paths)}
        has_children = {p[:-1] for p in tree.paths}
        n = hidden.shape[0]
        out = torch.empty((n, tree.num_nodes), dtype=torch.int64, device=hidden.device)
        # the head input of each node with children: its path's states, [n, (d + 2) * h]
        inputs = {(): torch.cat([hidden, self.embed[next_tokens].to(hidden.dtype)], dim=-1)}
        for depth in range(1, tree.depth + 1):
            level = [p for p in tree.paths if len(p) == depth]
            parents = list(dict.fromkeys(p[:-1] for p in level))
            state = self.head_state(depth - 1, torch.cat([inputs[q] for q in parents]))
            top = tree.max_rank(depth) + 1
            guesses = self.vocab.ids(self.head_logits(depth - 1, state).topk(top, dim=-1)
                                     .indices).view(len(parents), n, top)
            row = {q: j for j, q in enumerate(parents)}
            below = {}
            for p in level:
                token = guesses[row[p[:-1]], :, p[-1]]                  # [n]
                out[:, index[p]] = token
                if p in has_children:
                    below[p] = torch.cat([inputs[p[:-1]], self.embed[token].to(hidden.dtype)],
                                         dim=-1)
            inputs = below
        return out

    @torch.no_grad()
    def start_as_base_guess(self) -> None:
        """Set every block so that each head guesses what the base would: the first block
        passing the hidden state through its res_connection, everything else zero (where
        training starts)."""
        h = self.config.hidden_size
        for p in self.trainable():
            p.zero_()
        for w in self.first_weight:                                     # [2h, (i + 2) h]
            w[:h, :h] = torch.eye(h, device=w.device)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters training fits: every block's (the lm heads stay as they are)."""
        return [*self.first_weight, *self.first_bias, self.weight, self.bias]


def hydra_config_from(config: dict, arch: ArchConfig, path: str) -> HydraConfig:
    """The heads' shape from a checkpoint's config.json, checked against the base model."""
    if "hydra_num_heads" not in config:
        raise ValueError(f"{path}/config.json is not a Hydra config: expected "
                         "'hydra_num_heads'")
    head_arch = config.get("hydra_head_arch", "mlp")
    if head_arch != "mlp":
        raise ValueError(f"{path}: Hydra head architecture {head_arch!r} is not supported "
                         f"(only 'mlp': prefix-mlp and cross-attn heads are Hydra++'s)")
    if not config.get("grounded_heads", True):
        raise ValueError(f"{path}: ungrounded Hydra heads (grounded_heads false) read no "
                         f"drafted tokens; they are Medusa heads, not supported in this layout")
    if config.get("hidden_state_offset", 0) != 0:
        raise ValueError(f"{path}: hidden_state_offset {config['hidden_state_offset']} is not "
                         f"supported: the heads read the model's final hidden state")
    for key, want in (("hidden_size", arch.hidden_size), ("vocab_size", arch.vocab_size)):
        if key in config and config[key] != want:
            raise ValueError(f"{path}: Hydra heads of {key} {config[key]} do not fit the "
                             f"model ({key} {want})")
    truncated = config.get("truncated_vocab_size")
    return HydraConfig(int(config["hydra_num_heads"]), int(config.get("hydra_num_layers", 1)),
                       arch.hidden_size, arch.vocab_size,
                       own_lm_heads=not config.get("use_base_lm_head", False),
                       truncated_vocab_size=(None if truncated in (None, arch.vocab_size)
                                             else int(truncated)))


def _targets(heads: HydraHeads) -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint name and the slice of the heads' parameters it fills."""
    cfg, h = heads.config, heads.config.hidden_size
    for i in range(cfg.num_heads):
        first = f"hydra_mlp.{i}.0"
        yield f"{first}.res_connection.weight", heads.first_weight[i][:h]
        yield f"{first}.res_connection.bias", heads.first_bias[i][:h]
        yield f"{first}.linear.weight", heads.first_weight[i][h:]
        yield f"{first}.linear.bias", heads.first_bias[i][h:]
        for j in range(1, cfg.num_layers):
            yield f"hydra_mlp.{i}.{j}.linear.weight", heads.weight[i, j - 1]
            yield f"hydra_mlp.{i}.{j}.linear.bias", heads.bias[i, j - 1]
        if heads.lm_weight is not None and heads.lm_bias is not None:
            yield f"hydra_lm_head.{i}.weight", heads.lm_weight[i]
            yield f"hydra_lm_head.{i}.bias", heads.lm_bias[i]


def _read(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint directory's tensors, from safetensors or the paper's torch.save file
    (read with weights_only: tensors, never code)."""
    st, pt = os.path.join(path, SAFETENSORS_FILE), os.path.join(path, TORCH_FILE)
    if os.path.isfile(st):
        with safe_open(st, framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    if os.path.isfile(pt):
        state = torch.load(pt, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"Hydra heads: {pt} holds no state dict")
        return state
    raise ValueError(f"Hydra heads: {path} has no {SAFETENSORS_FILE} or {TORCH_FILE}")


def load_hydra(path: str, arch: ArchConfig, embed: torch.Tensor, base_lm_head: torch.Tensor,
               dtype: torch.dtype, device: torch.device) -> HydraHeads:
    """Hydra heads from a checkpoint directory for a base model of `arch`; ValueError on
    anything missing, unexpected or misshapen."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"Hydra heads: {path} has no config.json")
    with open(config_path, encoding="utf-8") as f:
        cfg = hydra_config_from(json.load(f), arch, path)
    tensors = _read(path)
    token_map = tensors.pop(TOKEN_MAP, None)
    check_token_map("Hydra", path, cfg.truncated_vocab_size, token_map)
    heads = HydraHeads(cfg, embed, base_lm_head, dtype, device, token_map)
    with torch.no_grad():
        for name, dst in _targets(heads):
            if name not in tensors:
                raise ValueError(f"Hydra heads: {path} lacks tensor {name!r}")
            src = tensors.pop(name)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"Hydra tensor {name} has shape {tuple(src.shape)}, expected "
                                 f"{tuple(dst.shape)}")
            dst.copy_(src)
    if tensors:
        raise ValueError(f"Hydra heads: unexpected tensor {sorted(tensors)[0]!r} in {path} "
                         f"({len(tensors)} in all)")
    return heads


def save_hydra(heads: HydraHeads, path: str) -> None:
    """Write heads as Hydra's config.json and a safetensors file of its tensor names."""
    cfg = heads.config
    os.makedirs(path, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in _targets(heads)}
    if heads.vocab.token_map is not None:
        tensors[TOKEN_MAP] = heads.vocab.token_map.cpu()
    save_file(tensors, os.path.join(path, SAFETENSORS_FILE))
    config = {"model_type": "hydra", "hydra_num_heads": cfg.num_heads,
              "hydra_num_layers": cfg.num_layers, "hydra_head_arch": "mlp",
              "grounded_heads": True, "hidden_state_offset": 0,
              "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "use_base_lm_head": not cfg.own_lm_heads}
    if cfg.truncated_vocab_size is not None:
        config["truncated_vocab_size"] = cfg.truncated_vocab_size
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
