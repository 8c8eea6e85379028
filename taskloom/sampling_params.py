"""SamplingParams: how one request chooses its tokens and when it stops, validated up front.

Invalid values raise ValueError naming the parameter, the value and what is allowed, before the
request ever reaches the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


class InvalidParameter(ValueError):
    """A sampling parameter out of range; `param` names it (for API error responses)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[InvalidParameter], tuple[str, str]]:
        # pickled whole: an engine in its own process refuses requests with these
        return InvalidParameter, (self.param, str(self))


@dataclass
class StructuredOutputs:
    """A constraint on the completion's text (vLLM's `structured_outputs`); exactly one is
    set: `json`, a JSON schema (a dict or its JSON text) the completion must be an instance
    of; `json_object`, any JSON object; `regex`, a regular expression it must match whole;
    `choice`, the strings it must be one of; `grammar`, a Lark grammar (llguidance's
    dialect). The engine masks, before every sample, the tokens that would break it."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParameter("structured_outputs",
                                   "structured_outputs needs exactly one of json, "
                                   f"json_object, regex, choice, grammar; got {given or 'none'}")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidParameter("structured_outputs", "structured_outputs.choice must be "
                                   f"a list of non-empty strings, got {self.choice!r}")
        if not isinstance(self.json, (dict, str, type(None))):
            raise InvalidParameter("structured_outputs", "structured_outputs.json must be a "
                                   f"JSON schema (an object or its text), got {self.json!r}")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "json_object", "regex", "choice", "grammar"."""
        return next(k for k in ("json", "json_object", "regex", "choice", "grammar")
                    if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters (the OpenAI set plus the usual extensions).

    temperature 0 means greedy. top_k 0 (or -1) disables top-k. logprobs / prompt_logprobs ask
    for the log-probabilities of the chosen token plus that many top alternatives (0 to 20).
    A `seed` makes the request's samples reproducible whatever else shares the batch.
    `structured_outputs` holds the completion to a JSON schema, a regex, a choice or a grammar.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = structured_outputs_from(self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        _check(self.n >= 1, "n must be >= 1", self.n)
        _check(self.temperature >= 0, "temperature must be >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(self.top_k >= 0, "top_k must be 0 or -1 (disabled) or >= 1", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0",
               self.repetition_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]",
               self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]",
               self.frequency_penalty)
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1",
               self.max_tokens)
        _check(self.min_tokens >= 0, "min_tokens must be >= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= MAX_LOGPROBS,
                   f"{name} must be between 0 and {MAX_LOGPROBS}", value)
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a list of non-empty strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers", self.stop_token_ids)
        _check(self.seed is None or isinstance(self.seed, int), "seed must be an integer",
               self.seed)
        _check(self.structured_outputs is None or self.min_tokens == 0,
               "min_tokens must be 0 with structured_outputs (the grammar decides where the "
               "output may end)", self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a repetition, presence or frequency penalty applies."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def reads_output(self) -> bool:
        """Whether sampling reads the tokens generated so far (penalties, min_tokens)."""
        return self.min_tokens > 0 or self.penalized


def structured_outputs_from(fields: dict) -> StructuredOutputs:
    """StructuredOutputs from its fields as a dict; InvalidParameter naming an unknown key."""
    known = set(StructuredOutputs.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InvalidParameter("structured_outputs", f"unknown structured_outputs keys "
                               f"{', '.join(unknown)}; expected one of {', '.join(sorted(known))}")
    return StructuredOutputs(**fields)


def _check(ok: bool, message: str, value: object) -> None:
    """Raise InvalidParameter if not ok; `message` starts with the parameter's name."""
    if not ok:
        raise InvalidParameter(message.split(" ", 1)[0], f"{message}, got {value!r}")
