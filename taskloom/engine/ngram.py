"""Prompt-lookup drafts for speculative decoding: the n-gram proposer.

A request's next tokens often repeat earlier ones: a summary quotes its source, an edit copies
most of the code it changes, an extraction repeats field names, a chat answer restates the
question. Prompt lookup (Saxena 2023; vLLM's and HF's `ngram` speculative method) bets on it:
find the last `n` tokens of the sequence earlier in its prompt or output, and propose the
tokens that followed them there. The model then scores every proposed position in one forward
(taskloom.engine.scheduler schedules them as the request's tokens of the step); the tokens it
would have produced itself are kept, so greedy and seeded outputs stay what they would have
been, and a step may advance a request by several tokens.

The longest n-gram found wins (n from `prompt_lookup_max` down to `prompt_lookup_min`), at
its most recent earlier occurrence. Each request keeps an index from n-gram to that
occurrence, extended by the tokens added since the last proposal, so a proposal costs a few
dictionary lookups however long the sequence is. Pure Python, as the engine is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from taskloom.config import SpeculativeConfig
from taskloom.engine.request import Request


@dataclass
class _Index:
    """A request's tokens so far, and per n the latest position following each n-gram."""

    tokens: list[int] = field(default_factory=list)
    # after[n - min_n][ngram] = j: tokens[j - n:j] == ngram, the latest such j < len(tokens)
    after: list[dict[tuple[int, ...], int]] = field(default_factory=list)


class NgramProposer:
    """Proposes up to `num_speculative_tokens` draft tokens per request by prompt lookup."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._indexes: dict[str, _Index] = {}

    def propose(self, req: Request, max_tokens: int) -> list[int]:
        """The drafts for the request's next positions: at most `min(k, max_tokens)` tokens,
        none when its recent tokens were not seen before."""
        limit = min(self.k, max_tokens)
        if limit < 1:
            return []
        index = self._extend(req)
        tokens = index.tokens
        end = len(tokens)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            j = index.after[n - self.min_n].get(tuple(tokens[end - n:]))
            if j is not None:
                return tokens[j:j + limit]
        return []

    @property
    def num_requests(self) -> int:
        """Requests with an index: those proposed for that have not finished."""
        return len(self._indexes)

    def remove(self, req_id: str) -> None:
        """Forget a finished request's index; unknown ids are ignored."""
        self._indexes.pop(req_id, None)

    def _extend(self, req: Request) -> _Index:
        """The request's index, brought up to its current tokens."""
        index = self._indexes.get(req.request_id)
        if index is None:
            index = _Index(after=[{} for _ in range(self.min_n, self.max_n + 1)])
            self._indexes[req.request_id] = index
        tokens = index.tokens
        old = len(tokens)
        tokens += req.token_ids_slice(old, req.num_tokens)
        # the n-grams ending just before each new token j: it follows them
        for j in range(max(old, self.min_n), len(tokens)):
            for n in range(self.min_n, min(self.max_n, j) + 1):
                index.after[n - self.min_n][tuple(tokens[j - n:j])] = j
        return index
