"""The token-budget scheduler (continuous batching with chunked prefill, FCFS, preemption).

Every step hands out at most `max_num_batched_tokens` tokens. A request's share is what
brings `num_computed_tokens` up to the tokens it has: a whole or partial prompt (a prefill
chunk), one token (a decode), or the prompt plus its outputs again after a preemption. Running
requests are served first, in arrival order; waiting requests are admitted while the budget,
`max_num_seqs` and the KV pool allow. When a running request cannot get a block, the latest
admitted running request is preempted (its blocks freed, its progress reset, recomputed later).

With LoRA adapters, the running requests may use at most `max_loras` distinct adapters (the
device slots). A waiting request whose adapter would exceed that is passed over, and requests
behind it that fit are admitted; so that it does not starve, the running adapter with the
fewest requests admits no more until it drains and frees its slot for the waiting one.

With speculative decoding (a `proposer`), a decoding request's share may also carry draft
tokens (`ScheduledSeq.draft_token_ids`), as many as the budget, its max_tokens and the model's
context leave room for, when blocks for them are free: drafts never preempt anyone. The step
computes them like any other tokens and samples at each of their positions; `update` keeps
the drafts the model agreed with, then the token it sampled after them, and takes
`num_computed_tokens` back past the rejected ones (their KV slots are simply written again).
The drafts come from prompt lookup (taskloom.engine.ngram) or from the model itself (Medusa
or Hydra heads, taskloom.engine.model_drafts): then each step asks the runner for its guesses
of the tokens after the step's (`SchedulerOutput.num_model_drafts`), and the next step carries
them, as a chain or as a tree of guesses (taskloom.engine.draft_tree; the runner then names
the path it kept, and the accounting is the same: the tree's nodes were computed, those off
the path are taken back).

With SnapKV (`KVCacheManager.snapkv`), a prompt it compresses is chunked so that its last
chunk ends with the prompt and holds its whole observation window: that step carries the
compression (`ScheduledSeq.compress`), and the next schedule puts the kept entries in the
request's table (`KVCacheManager.apply_compressions`) before anything else is allocated.
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from taskloom.config import SchedulerConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.model_drafts import ModelDraftProposer
from taskloom.engine.ngram import NgramProposer
from taskloom.engine.outputs import (PLACEHOLDER_TOKEN_ID, NewRequestData, RunnerOutput,
                                     ScheduledSeq, SchedulerOutput)
from taskloom.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from taskloom.engine.structured import Grammar

logger = logging.getLogger(__name__)


@dataclass
class SpecDecodeStats:
    """Speculative decoding so far: steps of a request that carried drafts, the draft tokens
    they carried, and those the model accepted (vLLM's spec_decode counters), and of those,
    per position: how many steps kept a draft at depth d + 1 (so entry 0 counts the steps
    that kept any, and the entries sum to num_accepted_tokens)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens \
            else 0.0


class Scheduler:
    """Decides who runs each step and accounts for the KV blocks they hold."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 max_loras: int = 0,
                 proposer: NgramProposer | ModelDraftProposer | None = None) -> None:
        if proposer is not None and config.async_scheduling:
            raise ValueError("speculative decoding does not run with async scheduling")
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_loras = max_loras      # 0: adapters are not served
        self.proposer = proposer
        self.spec_stats = SpecDecodeStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._seen_by_runner: set[str] = set()
        self.num_preemptions = 0
        # Unfinished requests whose sampling reads their generated tokens on the host
        # (Request.needs_output_history): while any is here, steps do not overlap.
        self.num_history_requests = 0
        # (sequence, its grammar, its drafts) of the latest step's constrained sequences,
        # whose masks fill_bitmasks computes
        self._mask_jobs: list[tuple[ScheduledSeq, Grammar, Sequence[int]]] = []

    # ----- admission -------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Raise ValueError for a request that could never run: too long for the model's
        context, or for the whole KV pool even with every other request preempted."""
        if num_prompt_tokens < 1:
            raise ValueError("prompt must contain at least one token")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens but the model's context length is "
                f"{self.max_model_len}: at most {self.max_model_len - 1} prompt tokens leave "
                f"room for one generated token")
        total = min(num_prompt_tokens + (max_tokens or self.max_model_len), self.max_model_len)
        need = self.kv.peak_blocks(total, self.config.max_num_batched_tokens, num_prompt_tokens)
        if need > self.kv.num_blocks:
            within = "" if self.kv.window is None else ", within its sliding window"
            raise ValueError(
                f"request of up to {total} tokens needs {need} blocks of {self.kv.block_size} "
                f"tokens of KV cache at once{within}, but the whole pool has "
                f"{self.kv.num_blocks} blocks; lower max_tokens or give the KV cache more "
                f"memory")

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.lora is not None and not self.max_loras:
            raise ValueError(f"request {req.request_id!r} names adapter {req.lora.name!r}, but "
                             f"this engine was started without LoRA support")
        self.check_fits(req.num_prompt_tokens, req.max_tokens)
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self.num_history_requests += req.needs_output_history

    # ----- scheduling ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.kv.apply_compressions()    # the steps that compressed prompts are submitted
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        drafts: dict[str, tuple[list[int], tuple[int, ...]]] = {}   # id -> (drafts, parents)
        preempted = False
        finishing = 0       # running requests whose last token is in flight
        running, has_room, proposer = self.running, self.kv.has_room, self.proposer
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            in_flight = req.num_output_placeholders
            if in_flight and self._at_limit(req):
                finishing += 1      # nothing more to compute: it ends when the token comes
                i += 1
                continue
            num_new = (len(req.prompt_token_ids) + len(req.output_token_ids) + in_flight
                       - req.num_computed_tokens)
            if num_new > budget:
                num_new = budget
            if self.kv.snapkv is not None:
                num_new = self._snapkv_chunk(req, req.num_computed_tokens, num_new)
                if num_new <= 0:
                    i += 1      # its prompt's last chunk does not fit this step's budget
                    continue
            draft = (self._draft(req, budget - 1)
                     if proposer is not None and num_new == 1 and req.output_token_ids else None)
            if draft:       # its blocks are taken
                drafts[req.request_id] = draft
                num_new += len(draft[0])
            # most decodes: the table has room and no block fills, so nothing to allocate
            elif not has_room(req.request_id, req.num_computed_tokens + num_new):
                num_running = len(running)
                ok = self._reserve(req, num_new)
                preempted = preempted or len(running) < num_running
                if not ok:
                    break  # req itself was preempted: everything after it already was
            scheduled.append((req, num_new))
            budget -= num_new
            i += 1
        if not preempted and self.waiting:
            budget = self._admit(scheduled, budget, finishing)
        return self._build_output(scheduled, budget, drafts)

    def _draft(self, req: Request, room: int) -> tuple[list[int], tuple[int, ...]] | None:
        """Draft tokens for a decoding request and their parents in the draft tree (() for a
        chain): at most `room`, none deeper than its max_tokens and the model's context can
        still take along with the token sampled after them; none (None) unless the blocks
        for them are free (drafts preempt no one)."""
        num_tokens = req.num_tokens
        room = min(room, self.max_model_len - num_tokens - 1)
        depth = room
        if req.params.max_tokens is not None:
            depth = min(depth, req.params.max_tokens - len(req.output_token_ids) - 1)
        proposer = self.proposer
        assert proposer is not None
        parents: tuple[int, ...] = ()
        if isinstance(proposer, ModelDraftProposer) and proposer.tree is not None \
                and req.grammar is None:
            draft, parents = proposer.propose_tree(req, room, depth)
        else:
            draft = proposer.propose(req, min(room, depth))
        if draft and req.grammar is not None:      # only what its structured output allows
            draft = draft[:req.grammar.valid_prefix(draft)]
        if not draft or self.kv.allocate_slots(req, num_tokens + len(draft)) is None:
            return None
        return draft, parents

    def _at_limit(self, req: Request) -> bool:
        """Whether the tokens in flight already take the request to max_tokens or the
        model's context, so that it must not be scheduled again (async scheduling)."""
        n_out = len(req.output_token_ids) + req.num_output_placeholders
        max_tokens = req.params.max_tokens
        return (max_tokens is not None and n_out >= max_tokens) or \
            len(req.prompt_token_ids) + n_out >= self.max_model_len

    def _reserve(self, req: Request, num_new: int) -> bool:
        """Get blocks for `num_new` more tokens of a running request, preempting the latest
        admitted requests until they fit. False if `req` itself had to be preempted."""
        while self.kv.allocate_slots(req, req.num_computed_tokens + num_new) is None:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s", req.request_id)

    def _admit(self, scheduled: list[tuple[Request, int]], budget: int, finishing: int = 0
               ) -> int:
        """Admit waiting requests in order while budget, seats and blocks last; requests
        held back by the adapter-slot limit are passed over (see the module docstring).
        `max_num_seqs` bounds the sequences a step runs: the `finishing` running requests
        (async scheduling: their last token is in flight, they run no more) hold no seat."""
        seats = self.config.max_num_seqs + finishing
        if len(self.running) >= seats:
            return budget       # every seat taken: nothing to count the adapters for
        active = Counter(r.lora_id for r in self.running if r.lora_id is not None)
        draining: int | None = None
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < seats:
            req = self.waiting[i]
            if req.num_output_placeholders:
                i += 1      # preempted with a token in flight: admitted once it is known
                continue
            lid = req.lora_id
            if lid is not None and lid not in active and len(active) >= self.max_loras:
                if draining is None:
                    draining = min(active, key=lambda k: (active[k], k))
                i += 1
                continue
            if lid is not None and lid == draining:
                i += 1
                continue
            num_new = self._admit_one(req, budget)
            if num_new is None:
                break
            del self.waiting[i]
            scheduled.append((req, num_new))
            budget -= num_new
            if lid is not None:
                active[lid] += 1
        return budget

    def _admit_one(self, req: Request, budget: int) -> int | None:
        """Give a waiting request its cached prefix and blocks for its first chunk and mark it
        running; the chunk's size, or None (nothing changed) when the pool is short."""
        hits = self.kv.find_cached_prefix(req)
        num_cached = len(hits) * self.kv.block_size
        num_new = min(req.num_tokens - num_cached, budget)
        if self.kv.snapkv is not None:
            num_new = self._snapkv_chunk(req, num_cached, num_new)
            if num_new <= 0:
                return None     # its prompt's last chunk does not fit this step's budget
        if self.kv.allocate_slots(req, num_cached + num_new, hits) is None:
            return None
        self.kv.stats.queries += req.num_tokens
        self.kv.stats.hits += num_cached
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return num_new

    def _snapkv_chunk(self, req: Request, start: int, num_new: int) -> int:
        """How much of `num_new` tokens from `start` a request's step may compute under
        SnapKV: a prompt it compresses ends its chunk, and that chunk holds the prompt's
        whole observation window (no chunk ends inside it). At most 0: none this step."""
        snapkv = self.kv.snapkv
        num_prompt = len(req.prompt_token_ids)
        if snapkv is None or start >= num_prompt or not snapkv.compresses(num_prompt):
            return num_new
        end = min(start + num_new, num_prompt)
        if end < num_prompt and num_prompt - end < snapkv.window_size:
            end = num_prompt - snapkv.window_size
        return end - start

    def _build_output(self, scheduled: list[tuple[Request, int]], budget: int,
                      drafts: dict[str, tuple[list[int], tuple[int, ...]]]
                      ) -> SchedulerOutput:
        new_requests, seqs = [], []
        kv = self.kv
        seen, tables = self._seen_by_runner, kv.block_tables
        has_bitmasks = False
        self._mask_jobs = []    # the last step's are filled, or its sequences left it
        for req, num_new in scheduled:
            rid = req.request_id
            if rid not in seen:
                seen.add(rid)
                new_requests.append(NewRequestData(rid, req.prompt_token_ids, req.params,
                                                   req.lora))
            start, out_ids = req.num_computed_tokens, req.output_token_ids
            num_prompt = len(req.prompt_token_ids)
            end = start + num_new
            known = num_prompt + len(out_ids)
            in_flight = req.num_output_placeholders
            draft, parents = drafts.get(rid, ((), ())) if drafts else ((), ())
            sample = end == known + in_flight + len(draft)    # it reaches the newest token
            if draft:
                token_ids = [out_ids[-1], *draft]
            elif num_new == 1 and sample and start >= num_prompt:
                # a decode, most sequences of most steps: its input is the newest token, or,
                # with async scheduling, the one the step in flight samples
                token_ids = [out_ids[-1] if start < known else PLACEHOLDER_TOKEN_ID]
            else:
                token_ids = req.token_ids_slice(start, min(end, known))
                token_ids += [PLACEHOLDER_TOKEN_ID] * (end - max(start, known))
            req.num_computed_tokens = end       # computed once this step has run
            if sample:
                req.num_output_placeholders = in_flight + 1
            seq = ScheduledSeq(rid, token_ids, start, tables[rid], sample, out_ids, num_prompt,
                               draft, parents)
            if kv.snapkv is not None:
                seq.kv_start = kv.kv_start(rid)
                seq.compress = kv.pending_compression(rid)
            if sample and req.grammar is not None:    # its mask comes with fill_bitmasks
                self._mask_jobs.append((seq, req.grammar, draft))
                has_bitmasks = True
            seqs.append(seq)
        finished, self._finished_ids = self._finished_ids, []
        proposer = self.proposer
        guesses = proposer.k if isinstance(proposer, ModelDraftProposer) else 0
        return SchedulerOutput(new_requests, seqs, finished,
                               self.config.max_num_batched_tokens - budget, has_bitmasks,
                               guesses)

    def fill_bitmasks(self) -> None:
        """Put the structured outputs' masks on the sequences of the step just scheduled
        (`SchedulerOutput.has_bitmasks`): one for a sequence's next token, or one a position
        with drafts. The runner calls this once the step's forward is on its way (see
        ModelRunner.submit), so that on a GPU the grammars work while the model does; nothing
        changes a grammar between a step's schedule and its sampling."""
        jobs, self._mask_jobs = self._mask_jobs, []
        for seq, grammar, draft in jobs:
            seq.allowed_token_bitmask = (grammar.bitmasks_along(draft) if draft
                                         else grammar.bitmask())

    # ----- results ---------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, out: RunnerOutput) -> list[Request]:
        """Give the scheduled requests this step's sampled tokens (their computed tokens were
        counted when the step was scheduled); return those that got any (finished ones
        included, with their status set and blocks freed). A request preempted since the
        step was scheduled (async scheduling) keeps its token: it was sampled from its
        whole context. With drafts, a request gets the drafts it kept and one token more."""
        advanced = []
        requests, sampled = self.requests, out.sampled
        stop_status = self._stop_status
        for seq in sched.seqs:
            if not seq.sample:
                continue
            req = requests.get(seq.req_id)
            if req is None or req.status.finished or req.output_token_ids is not \
                    seq.output_token_ids:
                continue  # aborted or stopped while the step ran (and its id taken again)
            req.num_output_placeholders -= 1
            token = sampled.get(seq.req_id)
            if token is None:
                continue
            if seq.draft_token_ids:
                self._accept(req, seq, out, token)
            else:
                req.output_token_ids.append(token)
                status = stop_status(req, token)
                if status is None and req.grammar is not None:
                    status = self._grammar_status(req, token)
                if status is not None:
                    self._finish(req, status)
            advanced.append(req)
            guess = out.draft_token_ids.get(seq.req_id) if out.draft_token_ids else None
            if guess is not None and not req.status.finished and \
                    isinstance(self.proposer, ModelDraftProposer):
                self.proposer.record(req, guess)
        if self.kv.window is not None:
            self._release_outside_windows(sched)
        return advanced

    def _release_outside_windows(self, sched: SchedulerOutput) -> None:
        """Give the pool back the blocks the scheduled requests' next queries cannot see."""
        requests, release = self.requests, self.kv.release_outside_window
        for seq in sched.seqs:
            req = requests.get(seq.req_id)
            if req is not None and not req.status.finished:
                release(seq.req_id, req.num_computed_tokens)

    def _accept(self, req: Request, seq: ScheduledSeq, out: RunnerOutput, token: int) -> None:
        """Take in a speculative step's result: the drafts the model kept (the first
        `num_accepted`, or of a tree, those on the path `out.accepted_paths` names), then
        `token`, each checked for a stop as a decode's token is; the other drafts' positions
        are computed again later."""
        draft, rid = seq.draft_token_ids, seq.req_id
        path = out.accepted_paths.get(rid)
        accepted = out.num_accepted.get(rid, 0) if path is None else len(path)
        if not 0 <= accepted <= len(draft):
            raise ValueError(f"{rid}: {accepted} of {len(draft)} drafts accepted")
        kept = draft[:accepted] if path is None else [draft[i] for i in path]
        stats = self.spec_stats
        stats.num_drafts += 1
        stats.num_draft_tokens += len(draft)
        stats.num_accepted_tokens += accepted
        per_pos = stats.num_accepted_tokens_per_pos
        if len(per_pos) < accepted:
            per_pos.extend([0] * (accepted - len(per_pos)))
        for d in range(accepted):
            per_pos[d] += 1
        req.num_computed_tokens -= len(draft) - accepted
        for t in (*kept, token):
            req.output_token_ids.append(t)
            status = self._stop_status(req, t)
            if status is None and req.grammar is not None:
                status = self._grammar_status(req, t)
            if status is not None:
                self._finish(req, status)
                return

    def _grammar_status(self, req: Request, token: int) -> RequestStatus | None:
        """Feed a structured output's grammar its request's new token: how the request ends
        if it does, once the grammar can take nothing more (a token it forbids, which its
        masks rule out, ends it with an error)."""
        grammar = req.grammar
        assert grammar is not None
        if not grammar.accept(token):
            logger.error("%s: token %d broke its structured output: %s", req.request_id,
                         token, grammar.error)
            return RequestStatus.FINISHED_ERROR
        return RequestStatus.FINISHED_STOPPED if grammar.done else None

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        n_out = len(req.output_token_ids)
        params = req.params
        if n_out >= params.min_tokens and (token in req.eos_token_ids
                                           or token in params.stop_token_ids):
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if (params.max_tokens is not None and n_out >= params.max_tokens) or \
                len(req.prompt_token_ids) + n_out >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def fail_scheduled(self, sched: SchedulerOutput, req_ids: set[str]) -> SchedulerOutput:
        """Take requests out of a scheduled step before it runs (their adapter could not be
        loaded): they finish with FINISHED_ERROR, the blocks the step would have filled for
        them lose their prefix-cache names, and the runner never hears of those it had not
        seen. Returns the step without them."""
        for new in sched.new_requests:
            if new.req_id in req_ids:
                self._seen_by_runner.discard(new.req_id)
        for seq in sched.seqs:
            req = self.requests.get(seq.req_id)
            if seq.req_id in req_ids and req is not None:
                self.kv.free_uncomputed(seq.req_id, seq.num_computed_tokens)
                self._finish(req, RequestStatus.FINISHED_ERROR)
        seqs = [q for q in sched.seqs if q.req_id not in req_ids]
        return SchedulerOutput([n for n in sched.new_requests if n.req_id not in req_ids],
                               seqs, sched.finished_req_ids,
                               sum(len(q.token_ids) for q in seqs), sched.has_bitmasks,
                               sched.num_model_drafts)

    def finish_requests(self, req_ids: list[str], status: RequestStatus) -> None:
        """Finish (stop string, abort) requests wherever they are; unknown ids are ignored."""
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is not None and not req.status.finished:
                self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req.request_id)
        self.kv.forget(req.request_id)
        if self.proposer is not None:
            self.proposer.remove(req.request_id)
        del self.requests[req.request_id]
        self.num_history_requests -= req.needs_output_history
        if req.request_id in self._seen_by_runner:
            self._seen_by_runner.discard(req.request_id)
            self._finished_ids.append(req.request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
