"""What callers get back: RequestOutput with one CompletionOutput per sample (`n`).

The engine emits a RequestOutput each step a request changes; `text` and `token_ids` are
cumulative, `text_delta` / `token_ids_delta` hold just this step's part (for streaming).
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
