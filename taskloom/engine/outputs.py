"""The plain-data messages of one engine step.

Scheduler -> runner: `SchedulerOutput`. Runner -> scheduler: `RunnerOutput`. Both hold Python
ints and lists only, so the scheduler never sees a tensor and the runner never sees a Request.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from taskloom.lora.request import LoRARequest
from taskloom.sampling_params import SamplingParams


# The input id of a token sampled by a step still in flight (async scheduling): the runner
# takes its real id from that step's sampled tokens on the device.
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class NewRequestData:
    """What the runner needs once, when a sequence first appears (or after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None = None


@dataclass
class KVCompression:
    """SnapKV for a sequence whose step computes the end of its prompt (`num_prompt_tokens`
    long): once the step's attention has run, each layer writes the KV entries each head
    keeps (the prompt's best positions, then its observation window) to positions
    `first_position .. num_prompt_tokens - 1` of the fresh blocks `block_ids`, which stand
    for block indices `first_position // block_size` onwards."""

    num_prompt_tokens: int
    first_position: int
    block_ids: list[int]


@dataclass
class ScheduledSeq:
    """One sequence's share of this step.

    The step computes tokens `token_ids` at positions `num_computed_tokens ...
    num_computed_tokens + len(token_ids) - 1`. When `sample` is set the last of them is the
    sequence's newest token and the runner samples the next one. `output_token_ids` is the
    live list of generated tokens (for penalties and min_tokens), shared, not copied. With
    async scheduling the last of `token_ids` may be PLACEHOLDER_TOKEN_ID: the token the
    previous step (still in flight) samples for this sequence. `allowed_token_bitmask` (a
    structured output's, taskloom.engine.structured) holds the tokens it may sample: bit i
    of little-endian int32 word w allows token 32 * w + i; with drafts, one such mask per
    sampled position, one after another. A sequence whose prompt SnapKV compressed holds KV
    from position `kv_start` on only (its block table is NULL_BLOCK before); one whose step
    compresses it carries `compress`. Drafts form a chain unless `draft_parents` is set:
    then draft i is node i + 1 of a tree (taskloom.engine.draft_tree) whose root, node 0, is
    the newest token, and `draft_parents[i]` its parent node; each node sits at the
    position of its depth and attends to the context and its ancestors only, while its KV
    takes the slot of position `num_computed_tokens + i + 1` until the step keeps it.
    """

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    sample: bool
    output_token_ids: list[int]
    num_prompt_tokens: int
    draft_token_ids: Sequence[int] = ()
    draft_parents: Sequence[int] = ()
    allowed_token_bitmask: bytes | None = None
    kv_start: int = 0
    compress: KVCompression | None = None


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    seqs: list[ScheduledSeq]
    finished_req_ids: list[str]   # gone since the last step: the runner drops their state
    num_scheduled_tokens: int
    has_bitmasks: bool = False    # some sequence carries a structured output's masks
    # draft heads: the runner returns, for each sampled sequence, this many guesses of the
    # tokens after the step's (RunnerOutput.draft_token_ids); 0: none asked
    num_model_drafts: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class Logprobs:
    """Log-probabilities for one position: the chosen token first, then the top alternatives.

    `token_ids[0]` / `logprobs[0]` are the chosen (sampled or prompt) token and `rank` its rank
    in the distribution (1 = most likely); `token_ids[1:]` are the top-k alternatives in order.
    """

    token_ids: list[int]
    logprobs: list[float]
    rank: int


@dataclass
class RunnerOutput:
    """A step's results by request: the sampled token (for a request with drafts, the token
    after the drafts it kept) and, with drafts, how many of them it kept; for requests that
    asked for logprobs, those of the sampled token and of each kept draft."""

    sampled: dict[str, int] = field(default_factory=dict)
    num_accepted: dict[str, int] = field(default_factory=dict)
    # of a request whose drafts were a tree: the drafts kept, root to leaf (their indexes)
    accepted_paths: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, Logprobs] = field(default_factory=dict)     # of the sampled token
    draft_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # of kept drafts
    # With SchedulerOutput.num_model_drafts: the model's guesses of each request's next
    # tokens, after those it got in this step (drafts for its next step)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Prompt logprobs per request for this step's chunk: (first prompt position, entries).
    # Entry j scores prompt token at position first + j (position 0 has no logprob).
    prompt_logprobs: dict[str, tuple[int, list[Logprobs]]] = field(default_factory=dict)
