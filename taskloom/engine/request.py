"""Request: one sequence the engine generates, with the state the scheduler tracks.

A request with `n > 1` is split by the engine core into n sequences (`Request`s) that share a
parent id; each of them is scheduled on its own.
"""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from taskloom.lora.request import LoRARequest
from taskloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from taskloom.engine.structured import Grammar


class RequestStatus(enum.Enum):
    """Where a request is; `value` is a finished request's finish reason. `finished` is a
    plain attribute, not a property: it is read for every token of every step."""

    finished: bool

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = ("stop", True)
    FINISHED_LENGTH = ("length", True)
    FINISHED_ABORTED = ("abort", True)
    FINISHED_ERROR = ("error", True)   # could not run (e.g. its adapter failed to load)

    def __new__(cls, value: str, finished: bool = False) -> "RequestStatus":
        member = object.__new__(cls)
        member._value_ = value
        member.finished = finished
        return member


class Request:
    """A sequence's tokens and progress.

    `num_computed_tokens` counts the tokens whose KV is in the cache; each step the scheduler
    brings it closer to `num_tokens` (prompt plus generated), whatever the phase.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), arrival_time: float | None = None,
                 cache_salt: str | None = None, lora: LoRARequest | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else tuple(eos_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # Tokens sampled by steps still in flight (async scheduling): scheduled as inputs
        # before their ids are known, which the runner takes from the device.
        self.num_output_placeholders = 0
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # Extra key of the prefix-cache hash chain: requests whose KV differs for the same
        # tokens (another adapter, another tenant) must not share blocks.
        self.cache_salt = cache_salt
        self.lora = lora
        # Structured outputs: the constraint's state (taskloom.engine.structured.Grammar),
        # given by the engine core at admission; None: unconstrained.
        self.grammar: Grammar | None = None

    @property
    def lora_id(self) -> int | None:
        return None if self.lora is None else self.lora.lora_id

    @property
    def cache_key(self) -> str | None:
        """Everything besides the tokens that changes this request's KV: the adapter, the
        salt. The extra key of its prefix-cache hash chain."""
        parts = ([] if self.lora is None else [f"lora:{self.lora.lora_id}"]) + \
            ([] if self.cache_salt is None else [f"salt:{self.cache_salt}"])
        return "|".join(parts) or None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_tokens(self) -> int | None:
        return self.params.max_tokens

    @property
    def needs_output_history(self) -> bool:
        """Whether sampling reads the tokens generated so far (penalties, min_tokens, a
        structured output's grammar): such a request's steps cannot be scheduled before the
        previous one's tokens are known."""
        return self.params.reads_output or self.params.structured_outputs is not None

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
                f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
                f"{self.status.name})")
