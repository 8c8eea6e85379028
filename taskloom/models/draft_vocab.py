"""The tokens draft heads may guess: the whole vocabulary, or the N most frequent tokens.

A draft head's lm head is its costliest part: one [vocab, hidden] matmul per head and step,
which for a small batch reads the whole matrix (the embedded model: 49,152 x 576, 14 ms on
two CPU cores at batch 8; Llama-3-8B: 1 GB of bf16). Guessing among the N tokens the
model writes most (vLLM's `truncated_vocab_size` and `token_map` for Medusa and EAGLE
checkpoints; FR-Spec, EAGLE-3) cuts that by vocab / N; a draft outside them is lost, but
drafts are verified, so outputs do not change. `token_map` [N] holds the kept tokens' ids:
head logits are over those N, index j standing for token `token_map[j]`.
"""
from __future__ import annotations

import torch

IGNORE = -100     # a training target outside the draft vocabulary
TOKEN_MAP = "token_map"     # the checkpoint tensor of the kept ids (vLLM's name)


class DraftVocab:
    """All `vocab_size` tokens (token_map None), or the ids in `token_map` [N]."""

    def __init__(self, vocab_size: int, token_map: torch.Tensor | None = None) -> None:
        self.vocab_size = vocab_size
        self.token_map: torch.Tensor | None = None
        self._lookup: torch.Tensor | None = None     # id -> index (IGNORE): `index`'s table
        if token_map is None:
            return
        ids = token_map.to(torch.int64).flatten()
        if len(ids) == 0 or len(ids) > vocab_size:
            raise ValueError(f"a draft vocabulary of {len(ids)} tokens does not fit a "
                             f"vocabulary of {vocab_size}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"token_map holds ids outside 0..{vocab_size - 1}")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("token_map holds an id twice")
        self.token_map = ids

    @property
    def size(self) -> int:
        """How many tokens the heads choose among: their logits' width."""
        return self.vocab_size if self.token_map is None else len(self.token_map)

    def to(self, device: torch.device) -> DraftVocab:
        if self.token_map is not None:
            self.token_map = self.token_map.to(device)
            self._lookup = None
        return self

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of a full-vocabulary lm head [vocab, hidden] the heads use [N, hidden]."""
        return weight if self.token_map is None else weight[self.token_map]

    def ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indexes into the draft vocabulary."""
        return index if self.token_map is None else self.token_map[index]

    def index(self, ids: torch.Tensor) -> torch.Tensor:
        """Indexes into the draft vocabulary of token ids (training targets); IGNORE where a
        token is not in it (and where an id is IGNORE already)."""
        if self.token_map is None:
            return ids
        if self._lookup is None:
            self._lookup = torch.full((self.vocab_size,), IGNORE, dtype=torch.int64,
                                      device=self.token_map.device)
            self._lookup[self.token_map] = torch.arange(len(self.token_map),
                                                        device=self.token_map.device)
        return torch.where(ids >= 0, self._lookup[ids.clamp(min=0)], IGNORE)


def check_token_map(kind: str, path: str, truncated_vocab_size: int | None,
                    token_map: torch.Tensor | None) -> None:
    """A checkpoint has a token_map tensor exactly when its config truncates the vocabulary;
    ValueError naming both otherwise."""
    if (truncated_vocab_size is None) != (token_map is None):
        raise ValueError(f"{kind} heads: {path} has a {TOKEN_MAP} tensor only with "
                         f"truncated_vocab_size below the vocabulary in its config.json "
                         f"(truncated_vocab_size {truncated_vocab_size}, "
                         f"{'a' if token_map is not None else 'no'} {TOKEN_MAP})")


def most_frequent(token_lists: list[list[int]], vocab_size: int, size: int) -> torch.Tensor:
    """The `size` ids written most often in `token_lists` (ties to the smaller id), as a
    token_map [size]; ids never written fill the rest in order."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for tokens in token_lists:
        counts += torch.bincount(torch.tensor(tokens, dtype=torch.int64), minlength=vocab_size)
    # a stable sort of descending counts keeps equal counts in id order
    return torch.sort(counts, descending=True, stable=True).indices[:size]
