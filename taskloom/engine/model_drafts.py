"""Drafts the model proposes for itself (Medusa or Hydra heads), as the scheduler's proposer
sees them.

With draft heads, a step's drafts come out of the step before: after sampling, the runner
reads the heads on the final hidden state of each sequence's last accepted position (Hydra's
also on the token it sampled there) and returns their top-1 guesses for the tokens after the
one it sampled (RunnerOutput.draft_token_ids).
The scheduler hands them here when it takes the step's tokens in; the next schedule() asks
for them, as it asks the n-gram proposer for its own. Proposals are tied to the length the
request had when they were made, so a request that has moved on since (preempted, or a stop
that cut it) gets none rather than stale ones.

With a token tree (taskloom.engine.draft_tree), the runner returns a guess for every node of
the tree, and a request gets the tree, or as much of it as its step has room for; a request
with a structured output, whose grammar checks drafts as a chain, gets the tree's chain of
best guesses. Pure Python, as the engine is.
"""
from __future__ import annotations

from collections.abc import Sequence

from taskloom.config import SpeculativeConfig
from taskloom.engine.request import Request


class ModelDraftProposer:
    """Hands each request the drafts its last step's heads proposed: a chain of up to
    `num_speculative_tokens`, or with a token tree, the tree's nodes."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.tree = config.token_tree
        # guesses the runner returns per request: one per depth, or one per tree node
        self.num_guesses = self.k if self.tree is None else self.tree.num_nodes
        self._chain = None if self.tree is None else self.tree.top_chain
        self._parents = () if self.tree is None else self.tree.parents
        self._drafts: dict[str, tuple[int, list[int]]] = {}   # id -> (its num_tokens, drafts)

    def record(self, req: Request, drafts: Sequence[int]) -> None:
        """The heads' guesses for the tokens after the request's current ones."""
        self._drafts[req.request_id] = (req.num_tokens, list(drafts[:self.num_guesses]))

    def _guesses(self, req: Request) -> list[int] | None:
        entry = self._drafts.get(req.request_id)
        return None if entry is None or entry[0] != req.num_tokens else entry[1]

    def propose(self, req: Request, max_tokens: int) -> list[int]:
        """The chain of drafts for the request's next positions: at most
        `min(k, max_tokens)` tokens (with a tree, its best guesses'), none when the heads
        have not guessed from its current tokens."""
        guesses = self._guesses(req)
        if guesses is None or max_tokens < 1:
            return []
        if self._chain is not None:
            return [guesses[i] for i in self._chain[:max_tokens]]
        return guesses[:max_tokens]

    def propose_tree(self, req: Request, max_nodes: int, max_depth: int
                     ) -> tuple[list[int], tuple[int, ...]]:
        """The tree of drafts for the request's next positions, as far as `max_nodes` nodes
        and `max_depth` depths reach: its nodes' tokens and parents (node 0 the root, draft
        i node i + 1); none when the heads have not guessed from its current tokens."""
        assert self.tree is not None, "propose_tree without a token tree"
        guesses = self._guesses(req)
        n = 0 if guesses is None else self.tree.num_within(max_nodes, max_depth)
        if not n:
            return [], ()
        assert guesses is not None
        return guesses[:n], self._parents[:n]

    @property
    def num_requests(self) -> int:
        """Requests with drafts on record: those proposed for that have not finished."""
        return len(self._drafts)

    def remove(self, req_id: str) -> None:
        """Forget a finished request's drafts; unknown ids are ignored."""
        self._drafts.pop(req_id, None)
