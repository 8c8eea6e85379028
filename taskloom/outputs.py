"""What callers get back: RequestOutput with one CompletionOutput per sample (`n`).

How often and how much depends on the request's OutputKind (vLLM's RequestOutputKind). By
default (CUMULATIVE) the engine emits a RequestOutput each step a request changes, with every
completion whole (`text`, `token_ids`, `logprobs` so far) and `text_delta` /
`token_ids_delta` holding just this step's part. DELTA outputs hold only what is new, and only
the completions that changed (each knows its `index`): what a server streams, with no
per-step copy of what it already sent. FINAL_ONLY requests get one output, when they finish.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OutputKind(enum.Enum):
    """What the engine hands back for a request, and when."""

    CUMULATIVE = "cumulative"   # each step it changed: every completion so far, and the delta
    DELTA = "delta"             # each step it changed: only the new part of changed completions
    FINAL_ONLY = "final_only"   # once, when it finishes: every completion whole


@dataclass
class Logprob:
    """Log-probability of one token at one position, its rank (1 = most likely), its text."""

    logprob: float
    rank: int
    decoded_token: str


# One position: token id -> Logprob, the chosen token first, then the top alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: int | str | None = None    # the stop token id or stop string that matched
    logprobs: list[PositionLogprobs] | None = None
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # prompt_logprobs[0] is None (the first token has no context); then one entry per token.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Why the request could not be served (its adapter could not be loaded, ...); every
    # completion then has finish_reason "error".
    error: str | None = None


def add_delta(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a DELTA output into the cumulative output of the same request (None before the
    first); `delta` is taken over, not copied. Completions stay in index order, and each
    one's `text_delta` / `token_ids_delta` is the latest delta's."""
    if total is None:
        total = delta
        delta_outputs, total.outputs = delta.outputs, []
        return _fold(total, delta_outputs, concat_deltas=False)
    total.finished, total.error = delta.finished, delta.error
    return _fold(total, delta.outputs, concat_deltas=False)


def merge_deltas(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Fold a request's DELTA output into its previous one, not yet read: one delta covering
    both steps (`newer` is taken over). What a reader that falls behind the engine takes
    instead of the two (`taskloom.engine.client.OutputStream`)."""
    older.finished, older.error = newer.finished, newer.error
    return _fold(older, newer.outputs, concat_deltas=True)


def _fold(total: RequestOutput, deltas: list[CompletionOutput],
          concat_deltas: bool) -> RequestOutput:
    by_index = {c.index: c for c in total.outputs}
    for d in deltas:
        c = by_index.get(d.index)
        if c is None:
            total.outputs.append(d)
            continue
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if c.logprobs is not None and d.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        if concat_deltas:
            c.text_delta += d.text_delta
            c.token_ids_delta.extend(d.token_ids_delta)
        else:
            c.text_delta, c.token_ids_delta = d.text_delta, d.token_ids_delta
    total.outputs.sort(key=lambda c: c.index)
    return total
