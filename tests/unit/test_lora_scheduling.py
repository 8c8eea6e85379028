"""Adapter slots in the scheduler: exact admission decisions, no starvation, the adapter in the
prefix-cache key, and the registry's names and ids (no torch)."""
from __future__ import annotations

import pytest

from taskloom.config import SchedulerConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.lora.registry import LoRARegistry
from taskloom.lora.request import LoRARequest, MergeSpec
from taskloom.sampling_params import SamplingParams
from tests.unit.test_scheduler import assert_pool_full, step

A, B, C = (LoRARequest(name, i, path=f"/adapters/{name}") for i, name in
           enumerate("abc", start=1))


def make(max_loras: int, max_num_seqs: int = 8, prefix_caching: bool = False) -> Scheduler:
    kv = KVCacheManager(64, 4, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64), kv,
                     256, max_loras=max_loras)


def lreq(rid: str, lora: LoRARequest | None, max_tokens: int = 2, n_prompt: int = 4
         ) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=(0,), lora=lora)


def admitted(s: Scheduler) -> list[str]:
    out = step(s)
    return [n.req_id for n in out.new_requests]


def test_a_batch_never_holds_more_adapters_than_slots_and_others_pass_by() -> None:
    s = make(max_loras=2)
    for r in [lreq("a1", A), lreq("b1", B), lreq("c1", C), lreq("base", None),
              lreq("a2", A)]:
        s.add_request(r)
    # c1 would be a third adapter: passed over, and the base request behind it runs; a and b
    # tie for fewest running requests, the lower id (a) drains for c1, so a2 waits.
    assert admitted(s) == ["a1", "b1", "base"]
    assert [r.request_id for r in s.waiting] == ["c1", "a2"]
    lora_of = {"a1": A, "a2": A, "b1": B, "c1": C, "base": None}
    order = []
    while s.has_unfinished:
        out = step(s)
        order += [n.req_id for n in out.new_requests]
        loras = {lora_of[q.req_id] for q in out.seqs} - {None}
        assert len(loras) <= 2
    assert order == ["c1", "a2"]
    assert_pool_full(s)


def test_waiting_adapter_is_not_starved_by_a_stream_of_active_ones() -> None:
    """a and b hold both slots and keep getting new requests; c waits. The running adapter
    with the fewest requests (b) admits no more, drains, and c takes its slot."""
    s = make(max_loras=2, max_num_seqs=16)
    s.add_request(lreq("a0", A, max_tokens=50))
    s.add_request(lreq("a1", A, max_tokens=50))
    s.add_request(lreq("b0", B, max_tokens=3))
    s.add_request(lreq("c0", C, max_tokens=2))
    assert admitted(s) == ["a0", "a1", "b0"]
    s.add_request(lreq("b1", B, max_tokens=3))   # behind c0: held back while c0 waits
    s.add_request(lreq("a2", A, max_tokens=3))   # a is not draining: admitted
    assert admitted(s) == ["a2"]
    steps = 0
    while "c0" in {r.request_id for r in s.waiting}:
        step(s)
        steps += 1
        assert steps < 10, "c0 starves"
    assert "b1" in {r.request_id for r in s.waiting}
    assert {r.lora_id for r in s.running} <= {A.lora_id, C.lora_id}
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_requests_without_lora_support_are_refused() -> None:
    s = make(max_loras=0)
    with pytest.raises(ValueError, match="without LoRA support"):
        s.add_request(lreq("x", A))


def test_prefix_cache_never_shares_blocks_across_adapters() -> None:
    s = make(max_loras=3, prefix_caching=True)
    prompt = 13                     # three full blocks of 4 are cacheable
    for rid, lora in [("a", A), ("base", None), ("b", B)]:
        s.add_request(lreq(rid, lora, max_tokens=1, n_prompt=prompt))
        while s.has_unfinished:
            step(s)
    assert s.kv.stats.hits == 0     # same tokens, three different KVs
    s.add_request(lreq("a-again", A, max_tokens=1, n_prompt=prompt))
    step(s)
    assert s.kv.stats.hits == 12    # its own adapter's blocks are found
    while s.has_unfinished:
        step(s)
    assert_pool_full(s)


def test_cache_key_separates_adapter_and_salt() -> None:
    keys = {Request("r", [1], SamplingParams(), lora=lora, cache_salt=salt).cache_key
            for lora in (None, A, B) for salt in (None, "t1", f"lora:{A.lora_id}")}
    assert len(keys) == 9


def test_registry_names_ids_and_merges() -> None:
    reg = LoRARegistry(reserved=("base-model",))
    a = reg.reserve("a", "/x/a")
    b = reg.reserve("b", "/x/b")
    assert (a.lora_id, b.lora_id) == (1, 2) and reg.adapters == [a, b]
    with pytest.raises(ValueError, match="already in use"):
        reg.reserve("base-model", "/x/c")
    with pytest.raises(ValueError, match="already in use"):
        reg.reserve("a", "/x/c")
    with pytest.raises(ValueError, match="invalid"):
        reg.reserve("bad name", "/x/c")
    m, new = reg.merged({"a": 0.5, "b": 0.5}, "ties", density=0.5)
    assert new and m.merge == MergeSpec(((a, 0.5), (b, 0.5)), "ties", 0.5)
    assert reg.merged({"a": 0.5, "b": 0.5}, "ties", density=0.5) == (m, False)  # by recipe
    assert reg.remove("a") == [m.lora_id, a.lora_id]     # the merge made from it goes too
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        reg.resolve("a")
    c = reg.reserve("a", "/x/a")         # a name reused gets a new id
    assert c.lora_id == 4
    reg.discard(c)                       # its load failed
    assert reg.adapters == [b]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="svd"), "merge method"), (dict(density=0.0), "density"),
    (dict(majority_sign_method="x"), "majority_sign_method")])
def test_merge_spec_rejects_bad_recipes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MergeSpec(((A, 1.0),), **kwargs)
    with pytest.raises(ValueError, match="finite and non-zero"):
        MergeSpec(((A, 0.0),))


def test_failing_scheduled_requests_unnames_only_the_blocks_they_did_not_compute() -> None:
    """An adapter that cannot be loaded fails its requests before the step runs: they leave
    the step (and the runner never hears of new ones), the blocks the step would have filled
    lose their names (their KV was never written), blocks computed earlier keep them."""
    s = make(max_loras=3, prefix_caching=True)
    s.add_request(lreq("b-old", B, max_tokens=3, n_prompt=10))
    step(s)                                   # b-old computed 10 tokens: blocks 0, 1 named
    for rid, lora in [("a1", A), ("a2", A), ("base", None)]:
        s.add_request(lreq(rid, lora, max_tokens=2, n_prompt=10))
    out = s.schedule()
    assert [(q.req_id, q.num_computed_tokens, len(q.token_ids)) for q in out.seqs] == [
        ("b-old", 10, 1), ("a1", 0, 10), ("a2", 8, 2), ("base", 0, 10)]
    assert s.kv.block_tables["a1"] == [3, 4, 5] and s.kv.block_tables["a2"] == [3, 4, 6]
    a_hashes = [s.kv.pool.block_hash(b) for b in (3, 4)]
    failed = [s.requests[rid] for rid in ("a1", "a2", "b-old")]
    kept = s.fail_scheduled(out, {"a1", "a2", "b-old"})
    assert all(r.status == RequestStatus.FINISHED_ERROR for r in failed)
    assert [q.req_id for q in kept.seqs] == ["base"]
    assert [n.req_id for n in kept.new_requests] == ["base"]
    assert kept.num_scheduled_tokens == 10
    assert all(h not in s.kv.pool.cached for h in a_hashes)
    assert s.kv.pool.cached.keys() >= {s.kv.pool.block_hash(b) for b in (0, 1, 7, 8)}
    assert s.kv.block_tables.keys() == {"base"}
    s.update(kept, RunnerOutput(sampled={"base": 9}))
    nxt = s.schedule()
    assert nxt.finished_req_ids == ["b-old"]  # a1, a2 never reached the runner
    s.update(nxt, RunnerOutput(sampled={"base": 9}))
    while s.has_unfinished:
        step(s)
    s.add_request(lreq("a3", A, max_tokens=1, n_prompt=10))
    s.add_request(lreq("b-new", B, max_tokens=1, n_prompt=10))
    hits = s.kv.stats.hits
    step(s)
    assert s.kv.stats.hits - hits == 8        # b-new finds b-old's blocks; a3 finds nothing
    assert_pool_full(s)
