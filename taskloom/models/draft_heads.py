"""Draft heads: the small modules over a model's last hidden state that guess its next tokens
for speculative decoding, Medusa's (taskloom.models.medusa) and Hydra's
(taskloom.models.hydra), as the runner and the trainer see them.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from taskloom.engine.draft_tree import TokenTree
from taskloom.models.arch import ArchConfig
from taskloom.models.draft_vocab import DraftVocab
from taskloom.models.hydra import load_hydra
from taskloom.models.medusa import load_medusa

DRAFT_HEAD_METHODS = ("medusa", "hydra")


class DraftHeads(Protocol):
    """K heads; head i guesses the token at p + 2 + i from the base's state at p, among the
    tokens of `vocab`."""

    vocab: DraftVocab

    @property
    def num_heads(self) -> int: ...

    def propose(self, hidden: torch.Tensor, next_tokens: torch.Tensor, num_tokens: int
                ) -> torch.Tensor:
        """Drafts [n, num_tokens] int64 from the base's states [n, hidden] and the tokens
        [n] it sampled from them."""
        ...

    def propose_tree(self, hidden: torch.Tensor, next_tokens: torch.Tensor, tree: TokenTree
                     ) -> torch.Tensor:
        """A guess [n, tree.num_nodes] int64 for every node of `tree`
        (taskloom.engine.draft_tree), a node at depth d one of head d - 1's top guesses
        (after the path above it, for heads that read it)."""
        ...

    def train_states(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every head's state [K, n, hidden], the true next tokens [n, K] given."""
        ...

    def head_logits(self, head: int, state: torch.Tensor) -> torch.Tensor:
        """Head `head`'s logits over the draft vocabulary [n, N] from its state [n, hidden]."""
        ...

    def trainable(self) -> list[nn.Parameter]: ...


def load_draft_heads(method: str, path: str, arch: ArchConfig, embed: torch.Tensor,
                     lm_head: torch.Tensor, dtype: torch.dtype, device: torch.device
                     ) -> DraftHeads:
    """The heads of `method` at `path` for a base model of `arch`, with its input embedding
    and lm head [vocab, hidden]."""
    if method == "medusa":
        return load_medusa(path, arch, lm_head, dtype, device)
    if method == "hydra":
        return load_hydra(path, arch, embed, lm_head, dtype, device)
    raise ValueError(f"draft heads method must be one of {', '.join(DRAFT_HEAD_METHODS)}, "
                     f"got {method!r}")
