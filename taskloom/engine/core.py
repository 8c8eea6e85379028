"""EngineCore: the step loop (schedule -> submit -> take the results in) and output processing.

With async scheduling the loop is schedule N+1 -> submit N+1 -> take N in: the host's work
for a step runs while the device computes the previous one (see `EngineCore.step`).

Requests enter as prompt token ids plus SamplingParams; a request with `n > 1` becomes n
sequences (seeds `seed + i`) scheduled independently. After each step the new tokens are
detokenized incrementally, stop strings are matched across token boundaries, and one
RequestOutput per changed request is returned, in the form its OutputKind asks for
(cumulative, delta, or only once finished). Before a step runs, the runner readies its LoRA
adapters; the requests of one that cannot be loaded fail alone (finish_reason "error").
Pure Python: the runner is passed in.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from taskloom.engine.outputs import Logprobs, RunnerOutput, SchedulerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.engine.structured import Grammar, GrammarCompiler
from taskloom.lora.request import LoRARequest
from taskloom.outputs import (CompletionOutput, Logprob, OutputKind, PositionLogprobs,
                              RequestOutput)
from taskloom.sampling_params import SamplingParams
from taskloom.tokenizer.detokenizer import IncrementalDetokenizer
from taskloom.tokenizer.stop import StopStringMatcher
from taskloom.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class PendingStep(Protocol):
    """A step the runner has queued; `result()` waits for its sampled tokens."""

    def result(self) -> RunnerOutput: ...


class Runner(Protocol):
    prepare_s: float    # host time spent flattening steps into batches, in all

    def submit(self, sched: SchedulerOutput,
               before_sampling: Callable[[], None] | None = None) -> PendingStep: ...

    def add_lora(self, lora: LoRARequest) -> None: ...

    def load_loras(self, loras: list[LoRARequest]) -> dict[int, str]: ...

    def remove_lora(self, lora_id: int) -> None: ...


@dataclass
class StepTimes:
    """Wall time of the engine's steps by phase, summed (seconds), so a benchmark can tell how
    much of a step the host spends outside the model: on a GPU, time the device waits for.

    `execute` is the runner's part: preparing the batch (`prepare`, also counted in
    `execute`), queuing the forward and sampling, and `wait`ing for the sampled tokens (also
    counted in `execute`; on a CPU the work is done before the wait). `update` is the
    scheduler taking the tokens plus per-token output processing (detokenizing, stop strings);
    `outputs` builds the step's RequestOutputs. With async scheduling the host-only phases
    overlap the device's work, and `wait` is what is left of the device's time. `masks` is
    the host computing structured outputs' masks (counted in `execute`: the runner has it
    done once the forward is queued, so on a GPU it overlaps the forward). `tokens` and
    `seqs` count what the steps scheduled, the shape of the batches behind the times."""

    steps: int = 0
    tokens: int = 0
    seqs: int = 0
    schedule: float = 0.0
    execute: float = 0.0
    prepare: float = 0.0
    wait: float = 0.0
    update: float = 0.0
    outputs: float = 0.0
    masks: float = 0.0

    def since(self, earlier: "StepTimes") -> "StepTimes":
        """The times of the steps run after `earlier` (a copy taken then)."""
        return StepTimes(**{f.name: getattr(self, f.name) - getattr(earlier, f.name)
                            for f in dataclasses.fields(self)})

    def per_step_ms(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase, with the host-only phases' sum, and the
        mean tokens and sequences a step scheduled."""
        n = max(self.steps, 1)
        ms = {k: round(1000 * getattr(self, k) / n, 3)
              for k in ("schedule", "prepare", "execute", "wait", "update", "outputs",
                        "masks")}
        host = self.schedule + self.prepare + self.update + self.outputs
        return {"steps": self.steps, **ms, "host_only": round(1000 * host / n, 3),
                "tokens_per_step": round(self.tokens / n, 1),
                "seqs_per_step": round(self.seqs / n, 1)}


@dataclass
class _Seq:
    """Output-processing state of one sequence (one of a request's n samples)."""

    req: Request
    detok: IncrementalDetokenizer | None   # None: the model has no tokenizer (random weights)
    stop: StopStringMatcher
    completion: CompletionOutput
    changed: bool = False     # since the request's last output
    num_processed: int = 0    # of the request's output tokens (a step may add several)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_Seq]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    changed: bool = False
    finished_seqs: set[int] = field(default_factory=set)
    kind: OutputKind = OutputKind.CUMULATIVE
    error: str | None = None


class EngineCore:
    """Owns the scheduler and the runner; `step()` advances every running request once."""

    def __init__(self, scheduler: Scheduler, runner: Runner, tokenizer: Tokenizer | None,
                 vocab_size: int, eos_token_ids: tuple[int, ...],
                 runs_on: str | None = None) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.runs_on = runs_on      # the model's dtype and device, to tell ("bfloat16 on cpu")
        self._parents: dict[str, _Parent] = {}
        self._seq_owner: dict[str, tuple[_Parent, int]] = {}
        self.step_times = StepTimes()
        self.async_scheduling = scheduler.config.async_scheduling
        # async scheduling: the step submitted last, running while the next is scheduled
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        self._grammars: GrammarCompiler | None = None    # built at the first structured one

    # ----- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, lora: LoRARequest | None = None,
                    output_kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        """Queue a request, served with adapter `lora` if given; raise ValueError (and queue
        nothing) if it can never run. `output_kind` says what its outputs hold and when
        (taskloom.outputs): offline batches want FINAL_ONLY and servers DELTA, since a
        CUMULATIVE output copies the completion so far, O(output length), every step."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._validate_prompt(prompt_token_ids)
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer, and this model has none "
                             "(random weights); use stop_token_ids")
        self.scheduler.check_fits(len(prompt_token_ids), params.max_tokens)
        if lora is not None and not self.scheduler.max_loras:
            raise ValueError(f"adapter {lora.name!r} requested, but this engine was started "
                             f"without LoRA support (enable_lora / --enable-lora)")
        grammars = [self._grammar(params) for _ in range(params.n)] \
            if params.structured_outputs is not None else None
        parent = _Parent(request_id, prompt, list(prompt_token_ids), [],
                         [None] if params.prompt_logprobs is not None else None,
                         kind=output_kind)
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(seq_id, prompt_token_ids, self._child_params(params, i),
                          self.eos_token_ids, lora=lora)
            if grammars is not None:
                req.grammar = grammars[i]
            parent.seqs.append(_Seq(
                req,
                None if self.tokenizer is None else IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                StopStringMatcher(params.stop, params.include_stop_str_in_output),
                CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)))
        for i, seq in enumerate(parent.seqs):
            self.scheduler.add_request(seq.req)
            self._seq_owner[seq.req.request_id] = (parent, i)
        self._parents[request_id] = parent

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size),
                   None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is out of range: the vocabulary has "
                             f"{self.vocab_size} tokens (ids 0 to {self.vocab_size - 1})")

    def _grammar(self, params: SamplingParams) -> Grammar:
        """A fresh grammar for a structured request; ValueError naming what is wrong."""
        assert params.structured_outputs is not None
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer, and this model has none "
                             "(random weights)")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.vocab_size,
                                             self.eos_token_ids)
        return self._grammars.compile(params.structured_outputs)

    @staticmethod
    def _child_params(params: SamplingParams, i: int) -> SamplingParams:
        if params.n == 1:
            return params
        seed = None if params.seed is None else params.seed + i
        return dataclasses.replace(params, n=1, seed=seed,
                                   prompt_logprobs=params.prompt_logprobs if i == 0 else None)

    def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter into the runner's host cache now, so that errors in it surface
        here (ValueError) rather than in a step; requests can then name it."""
        if not self.scheduler.max_loras:
            raise ValueError("this engine was started without LoRA support "
                             "(enable_lora / --enable-lora)")
        self.runner.add_lora(lora)

    def remove_lora(self, lora_id: int) -> None:
        """Drop an adapter's host and device copies. Requests already queued with it still
        finish: their LoRARequest carries the path, and the runner reloads it if needed."""
        self.runner.remove_lora(lora_id)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free its blocks; unknown ids are ignored."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        ids = [s.req.request_id for s in parent.seqs]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self._seq_owner.pop(rid, None)

    def abort_all(self) -> None:
        """Abort every unfinished request (shutdown)."""
        for request_id in list(self._parents):
            self.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished(self) -> int:
        return len(self._parents)

    # ----- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step and return an output for every request that changed.

        With async scheduling, the step scheduled and submitted here runs on the device while
        the previous one's tokens are taken in, so a step's outputs come with the next call;
        a request whose sampling reads its own tokens (penalties, min_tokens) has each step's
        tokens taken in before the next is scheduled."""
        if not self.async_scheduling:
            sched = self._schedule()
            self._take(sched, self._submit(sched))
        else:
            in_flight, self._in_flight = self._in_flight, None
            if in_flight is not None and self.scheduler.num_history_requests:
                self._take(*in_flight)
                in_flight = None
            sched = self._schedule()
            pending = self._submit(sched)
            if not sched.is_empty:
                self._in_flight = (sched, pending)
            if in_flight is not None:
                self._take(*in_flight)
            if self._in_flight is not None and not self._parents:
                self._take(*self._in_flight)    # only work for requests already finished
                self._in_flight = None
        t0 = time.perf_counter()
        outputs = self._collect_outputs()
        self.step_times.outputs += time.perf_counter() - t0
        self.step_times.steps += 1
        return outputs

    def _schedule(self) -> SchedulerOutput:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if self.scheduler.max_loras:
            sched = self._load_adapters(sched)
        times = self.step_times
        times.schedule += time.perf_counter() - t0
        times.tokens += sched.num_scheduled_tokens
        times.seqs += len(sched.seqs)
        return sched

    def _submit(self, sched: SchedulerOutput) -> PendingStep:
        """Hand the step to the runner (always, even empty: it carries the ids of finished
        requests whose state the runner drops)."""
        times, prepared = self.step_times, self.runner.prepare_s
        t0 = time.perf_counter()
        pending = self.runner.submit(sched, self._fill_masks if sched.has_bitmasks else None)
        times.execute += time.perf_counter() - t0
        times.prepare += self.runner.prepare_s - prepared
        return pending

    def _fill_masks(self) -> None:
        t0 = time.perf_counter()
        self.scheduler.fill_bitmasks()
        self.step_times.masks += time.perf_counter() - t0

    def _take(self, sched: SchedulerOutput, pending: PendingStep) -> None:
        """Wait for a submitted step's results and take them in: the scheduler's update, then
        per-token output processing."""
        times = self.step_times
        t0 = time.perf_counter()
        out = pending.result()
        t1 = time.perf_counter()
        times.wait += t1 - t0
        times.execute += t1 - t0
        advanced = self.scheduler.update(sched, out)
        for rid, (first, entries) in out.prompt_logprobs.items():
            self._store_prompt_logprobs(rid, first, entries)
        for req in advanced:
            rid = req.request_id
            self._process_tokens(req, out.logprobs.get(rid), out.draft_logprobs.get(rid))
        times.update += time.perf_counter() - t1

    def _load_adapters(self, sched: SchedulerOutput) -> SchedulerOutput:
        """Have the runner ready the step's adapters before anything runs; the requests of an
        adapter it cannot load leave the step and fail alone (see `_fail`)."""
        requests = self.scheduler.requests
        loras = {}
        for seq in sched.seqs:
            lora = requests[seq.req_id].lora
            if lora is not None:
                loras[lora.lora_id] = lora
        errors = self.runner.load_loras(list(loras.values())) if loras else {}
        if not errors:
            return sched
        failed = {seq.req_id: errors[lid] for seq in sched.seqs
                  if (lid := requests[seq.req_id].lora_id) in errors}
        sched = self.scheduler.fail_scheduled(sched, set(failed))
        for seq_id, message in failed.items():
            self._fail(seq_id, message)
        return sched

    def _fail(self, seq_id: str, message: str) -> None:
        """End a sequence's whole request with an error (its other samples too: they share its
        adapter); the caller gets `error` and finish_reason "error"."""
        owner = self._seq_owner.get(seq_id)
        if owner is None or owner[0].error is not None:
            return
        parent = owner[0]
        logger.warning("request %s failed: %s", parent.request_id, message)
        self.scheduler.finish_requests([s.req.request_id for s in parent.seqs],
                                       RequestStatus.FINISHED_ERROR)
        parent.error = message
        for i, seq in enumerate(parent.seqs):
            if seq.completion.finish_reason is None:
                seq.completion.finish_reason = "error"
                seq.changed = True
            parent.finished_seqs.add(i)
        parent.changed = True

    def _store_prompt_logprobs(self, seq_id: str, first: int, entries: list[Logprobs]) -> None:
        owner = self._seq_owner.get(seq_id)
        if owner is None or owner[0].prompt_logprobs is None:
            return
        plp = owner[0].prompt_logprobs
        for j, lp in enumerate(entries):
            pos = first + j
            plp.extend([None] * (pos + 1 - len(plp)))
            plp[pos] = self._position_logprobs(lp)

    def _process_tokens(self, req: Request, lp: Logprobs | None,
                        draft_lps: list[Logprobs] | None = None) -> None:
        """Output processing of the tokens the step gave the request: one, or with
        speculative decoding several, each detokenized and matched against the stop strings
        in turn; a stop string ends the request there and drops the tokens after it. `lp`
        scores the token sampled last, `draft_lps` the kept drafts before it."""
        parent, index = self._seq_owner[req.request_id]
        seq = parent.seqs[index]
        out_ids = req.output_token_ids
        n = len(out_ids)
        first, seq.num_processed = seq.num_processed, n
        if first == n - 1:      # one token: every step without drafts
            self._process_token(parent, index, seq, req, out_ids[-1], lp, req.status.finished)
            return
        draft_lps = draft_lps or []
        for i in range(first, n):
            t, last = i - first, i == n - 1
            if self._process_token(parent, index, seq, req, out_ids[i],
                                   draft_lps[t] if t < len(draft_lps) else lp,
                                   last and req.status.finished):
                return

    def _process_token(self, parent: _Parent, index: int, seq: _Seq, req: Request,
                       token: int, lp: Logprobs | None, finished: bool) -> bool:
        """One new token of the sequence (`finished`: the scheduler ended it there); whether
        the sequence is now finished."""
        comp = seq.completion
        comp.token_ids.append(token)
        comp.token_ids_delta.append(token)
        if lp is not None and comp.logprobs is not None:
            comp.logprobs.append(self._position_logprobs(lp))
        matched = None
        if seq.detok is not None:
            text, matched = self._detokenize(seq, token, finished)
            comp.text += text
            comp.text_delta += text
        if matched is not None:
            self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            comp.finish_reason, comp.stop_reason = "stop", matched
        elif finished:
            comp.finish_reason = req.status.value
            comp.stop_reason = req.stop_reason if req.stop_reason not in self.eos_token_ids \
                else None
        parent.changed = seq.changed = True
        if comp.finish_reason is not None:
            parent.finished_seqs.add(index)
            return True
        return False

    @staticmethod
    def _detokenize(seq: _Seq, token: int, finished: bool) -> tuple[str, str | None]:
        """New printable text of the sequence and the stop string it hit, if any."""
        assert seq.detok is not None
        text, matched = seq.stop.push(seq.detok.push([token]))
        if matched is None and finished:
            tail, matched = seq.stop.push(seq.detok.flush())
            text += tail + ("" if matched else seq.stop.flush())
        return text, matched

    def _decode_token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _position_logprobs(self, lp: Logprobs) -> PositionLogprobs:
        result: PositionLogprobs = {}
        for j, (tid, value) in enumerate(zip(lp.token_ids, lp.logprobs)):
            if tid in result:
                continue
            rank = lp.rank if j == 0 else j
            result[tid] = Logprob(value, rank, self._decode_token(tid))
        return result

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        final_only, delta = OutputKind.FINAL_ONLY, OutputKind.DELTA
        for parent in [p for p in self._parents.values() if p.changed]:
            parent.changed = False
            finished = len(parent.finished_seqs) == len(parent.seqs)
            kind = parent.kind
            if kind is final_only and not finished:
                continue    # its deltas build up until the one output at the end
            # positional: a server's engine thread builds one of these per stream per step
            outputs.append(RequestOutput(
                parent.request_id, parent.prompt, parent.prompt_token_ids,
                _hand_over(parent) if kind is delta else self._completions(parent, finished),
                finished, parent.prompt_logprobs, parent.error))
            if finished:
                del self._parents[parent.request_id]
                for s in parent.seqs:
                    self._seq_owner.pop(s.req.request_id, None)
        return outputs

    @staticmethod
    def _completions(parent: _Parent, finished: bool) -> list[CompletionOutput]:
        """The completions of a CUMULATIVE or FINAL_ONLY output: a finished request's are
        handed over; otherwise they are copied."""
        if finished:
            return [s.completion for s in parent.seqs]
        snapshots = []
        for s in parent.seqs:
            snapshots.append(_snapshot(s.completion))
            s.completion.text_delta, s.completion.token_ids_delta = "", []
            s.changed = False
        return snapshots


def _hand_over(parent: _Parent) -> list[CompletionOutput]:
    """The completions of a DELTA output: the changed ones, each holding just what is new,
    taken over, with fresh ones (index, finish and stop reasons kept) left in their place."""
    handed = []
    for s in parent.seqs:
        if s.changed:
            c = s.completion
            handed.append(c)
            # (index, text, token_ids, finish_reason, stop_reason, logprobs)
            s.completion = CompletionOutput(c.index, "", [], c.finish_reason, c.stop_reason,
                                            None if c.logprobs is None else [])
            s.changed = False
    return handed


def _snapshot(c: CompletionOutput) -> CompletionOutput:
    return dataclasses.replace(c, token_ids=list(c.token_ids),
                               logprobs=None if c.logprobs is None else list(c.logprobs),
                               token_ids_delta=list(c.token_ids_delta))
