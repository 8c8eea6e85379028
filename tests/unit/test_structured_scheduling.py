"""Structured outputs on the host: the parameters' checks, and the scheduler's part (each
sampling step carries the request's mask once fill_bitmasks has run, every new token reaches
its grammar, the request ends when the grammar is done, drafts are cut to what the grammar
takes and carry a mask per position). No torch and no llguidance: a hand-made grammar plays its part."""
from __future__ import annotations

import pickle

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
        return f"m{len(self.taken):03d}".encode()

    def valid_prefix(self, tokens: list[int]) -> int:
        rest = self.script[len(self.taken):]
        return next((i for i, t in enumerate(tokens) if i >= len(rest) or rest[i] != t),
                    len(tokens))

    def bitmasks_along(self, tokens: list[int]) -> bytes:
        n = len(self.taken)
        return b"".join(f"m{n + i:03d}".encode() for i in range(len(tokens) + 1))

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
        assert out.has_bitmasks and out.seqs[0].allowed_token_bitmask is None
        s.fill_bitmasks()       # what the runner calls once the forward is queued
        masks.append(out.seqs[0].allowed_token_bitmask)
        s.update(out, RunnerOutput(sampled={"a": token}))
    assert masks == [b"m000", b"m001", b"m002"]
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


def test_drafts_are_cut_to_what_the_grammar_takes_with_a_mask_per_position() -> None:
    spec = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=2,
                                           prompt_lookup_max=2))
    s = scheduler(spec)
    a = constrained("a", [3, 1, 2, 9])
    b = Request("b", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=8), eos_token_ids=(0,))
    s.add_request(a)
    s.add_request(b)
    s.update(s.schedule(), RunnerOutput(sampled={"a": 3, "b": 3}))
    out = s.schedule()      # both propose 1, 2, 3 (after "2, 3" came "1, 2, 3")
    s.fill_bitmasks()
    seqs = {q.req_id: q for q in out.seqs}
    assert seqs["b"].draft_token_ids == [1, 2, 3] and seqs["b"].allowed_token_bitmask is None
    assert seqs["a"].draft_token_ids == [1, 2]           # the grammar wants 9 after 1, 2
    assert seqs["a"].allowed_token_bitmask == b"m001m002m003"
    s.update(out, RunnerOutput(sampled={"a": 9, "b": 5}, num_accepted={"a": 2, "b": 0}))
    assert a.output_token_ids == [3, 1, 2, 9] and a.status == RequestStatus.FINISHED_STOPPED
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


def test_a_refusal_crosses_to_the_server_process_whole() -> None:
    """An engine in its own process sends its refusals through a pipe (pickled)."""
    e = pickle.loads(pickle.dumps(InvalidParameter("structured_outputs", "bad grammar")))
    assert type(e) is InvalidParameter and e.param == "structured_outputs"
    assert str(e) == "bad grammar"
