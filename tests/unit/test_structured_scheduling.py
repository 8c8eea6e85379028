"""Structured outputs on the host: the parameters' checks, and the scheduler's part (each
sampling step carries the request's mask, every new token reaches its grammar, the request
ends when the grammar is done, no drafts under a grammar). No torch and no llguidance: a
hand-made grammar plays its part."""
from __future__ import annotations

import pytest

from taskloom.config import SchedulerConfig, SpeculativeConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.ngram import NgramProposer
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.sampling_params import InvalidParameter, SamplingParams, StructuredOutputs


class ScriptedGrammar:
    """Allows exactly `script`, one token after another; done after the last."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.taken = script, []

    def bitmask(self) -> bytes:
        return f"mask{len(self.taken)}".encode()

    def accept(self, token: int) -> bool:
        ok = len(self.taken) < len(self.script) and token == self.script[len(self.taken)]
        self.taken.append(token)
        return ok

    @property
    def done(self) -> bool:
        return self.taken == self.script

    @property
    def error(self) -> str | None:
        return None if self.taken == self.script[:len(self.taken)] else "off the script"


def constrained(rid: str, script: list[int], prompt: list[int] | None = None) -> Request:
    req = Request(rid, prompt or [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(
        max_tokens=32, structured_outputs=StructuredOutputs(regex="x")), eos_token_ids=(0,))
    req.grammar = ScriptedGrammar(script)    # type: ignore[assignment]
    return req


def scheduler(proposer: NgramProposer | None = None) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(32, 4), 128,
                     proposer=proposer)


def test_each_step_carries_the_mask_and_the_grammar_gets_every_token() -> None:
    s = scheduler()
    a = constrained("a", [7, 8, 9])
    s.add_request(a)
    masks = []
    for token in (7, 8, 9):
        out = s.schedule()
        masks.append(out.seqs[0].allowed_token_bitmask)
        s.update(out, RunnerOutput(sampled={"a": token}))
    assert masks == [b"mask0", b"mask1", b"mask2"]
    assert a.output_token_ids == [7, 8, 9] and a.status == RequestStatus.FINISHED_STOPPED
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_a_token_the_grammar_refuses_ends_the_request_with_an_error() -> None:
    s = scheduler()
    a = constrained("a", [7, 8])
    s.add_request(a)
    s.update(s.schedule(), RunnerOutput(sampled={"a": 5}))
    assert a.status == RequestStatus.FINISHED_ERROR
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_eos_and_max_tokens_still_end_a_constrained_request() -> None:
    s = scheduler()
    a = constrained("a", [7, 8, 9])
    s.add_request(a)
    s.update(s.schedule(), RunnerOutput(sampled={"a": 0}))     # EOS, allowed by its mask
    assert a.status == RequestStatus.FINISHED_STOPPED and a.grammar.taken == []


def test_unconstrained_requests_carry_no_mask_and_constrained_ones_no_drafts() -> None:
    spec = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=2,
                                           prompt_lookup_max=2))
    s = scheduler(spec)
    a = constrained("a", [3, 1, 2, 3, 1])
    b = Request("b", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=8), eos_token_ids=(0,))
    s.add_request(a)
    s.add_request(b)
    s.update(s.schedule(), RunnerOutput(sampled={"a": 3, "b": 3}))
    out = s.schedule()                 # both decode; the prompt repeats, so b drafts
    seqs = {q.req_id: q for q in out.seqs}
    assert seqs["a"].draft_token_ids == () and seqs["a"].allowed_token_bitmask == b"mask1"
    assert seqs["b"].draft_token_ids and seqs["b"].allowed_token_bitmask is None
    assert a.needs_output_history and not b.needs_output_history


def test_structured_outputs_parameters() -> None:
    assert StructuredOutputs(choice=["a", "b"]).kind == "choice"
    assert SamplingParams(structured_outputs={"regex": "[0-9]+"}).structured_outputs == \
        StructuredOutputs(regex="[0-9]+")
    with pytest.raises(InvalidParameter, match="exactly one of .* got \\['json', 'regex'\\]"):
        StructuredOutputs(json={"type": "object"}, regex="a")
    with pytest.raises(InvalidParameter, match="exactly one of .* got none"):
        StructuredOutputs()
    with pytest.raises(InvalidParameter, match="choice must be a list of non-empty strings"):
        StructuredOutputs(choice=[])
    with pytest.raises(InvalidParameter, match="unknown structured_outputs keys schema"):
        SamplingParams(structured_outputs={"schema": {}})
    with pytest.raises(InvalidParameter, match="min_tokens must be 0 with structured_outputs"):
        SamplingParams(min_tokens=2, structured_outputs={"json_object": True})
