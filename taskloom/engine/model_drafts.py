"""Drafts the model proposes for itself (Medusa or Hydra heads), as the scheduler's proposer
sees them.

With draft heads, a step's drafts come out of the step before: after sampling, the runner
reads the heads on the final hidden state of each sequence's last accepted position (Hydra's
also on the token it sampled there) and returns their top-1 guesses for the tokens after the
one it sampled (RunnerOutput.draft_token_ids).
The scheduler hands them here when it takes the step's tokens in; the next schedule() asks
for them, as it asks the n-gram proposer for its own. Proposals are tied to the length the
request had when they were made, so a request that has moved on since (preempted, or a stop
that cut it) gets none rather than stale ones. Pure Python, as the engine is.
"""
from __future__ import annotations

from collections.abc import Sequence

from taskloom.config import SpeculativeConfig
from taskloom.engine.request import Request


class ModelDraftProposer:
    """Hands each request the drafts its last step's heads proposed, up to
    `num_speculative_tokens`."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self._drafts: dict[str, tuple[int, list[int]]] = {}   # id -> (its num_tokens, drafts)

    def record(self, req: Request, drafts: Sequence[int]) -> None:
        """The heads' guesses for the tokens after the request's current ones."""
        self._drafts[req.request_id] = (req.num_tokens, list(drafts[:self.k]))

    def propose(self, req: Request, max_tokens: int) -> list[int]:
        """The drafts for the request's next positions: at most `min(k, max_tokens)` tokens,
        none when the heads have not guessed from its current tokens."""
        entry = self._drafts.get(req.request_id)
        if entry is None or entry[0] != req.num_tokens or max_tokens < 1:
            return []
        return entry[1][:max_tokens]

    @property
    def num_requests(self) -> int:
        """Requests with drafts on record: those proposed for that have not finished."""
        return len(self._drafts)

    def remove(self, req_id: str) -> None:
        """Forget a finished request's drafts; unknown ids are ignored."""
        self._drafts.pop(req_id, None)
