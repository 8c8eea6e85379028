"""Engines with the embedded model or the tiny chat model (tests/models/tiny_chat.py), shared
per session or module; every test ends with the KV pool full."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from taskloom import LLM


def assert_pool_full(llm: LLM) -> None:
    sched = llm.engine.scheduler
    assert not sched.has_unfinished and not llm.engine.has_unfinished
    assert sched.kv.num_free_blocks == sched.kv.num_blocks, "KV blocks leaked"
    assert not sched.kv.block_tables
    assert sched.proposer is None or sched.proposer.num_requests == 0, "draft index leaked"
    llm.engine.step()       # an empty step tells the runner which requests finished last
    assert llm.engine.runner.num_requests == 0, "the runner kept finished requests' state"


@pytest.fixture(scope="session")
def llm() -> Iterator[LLM]:
    engine = LLM(max_num_seqs=16, kv_cache_memory_gb=0.25)
    yield engine


@pytest.fixture(scope="session")
def tiny_llm(tiny_model: str) -> LLM:
    """The tiny chat model: the embedded model's tokenizer, a few milliseconds a step."""
    return LLM(tiny_model, max_num_seqs=16, kv_cache_memory_gb=0.25)


@pytest.fixture(autouse=True)
def _pool_full_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("llm", "tiny_llm", "small_llm", "chunked_llm", "tiny_pool_llm", "sync_llm",
                 "async_llm", "spec_llm", "tiny_spec_llm"):
        if name in request.fixturenames:
            assert_pool_full(request.getfixturevalue(name))
