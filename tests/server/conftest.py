"""A real server on 127.0.0.1 (embedded model, free port) shared by the server tests, an
oracle LLM for the expected outputs, and the check that every test leaves the KV pool full."""
from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from taskloom import LLM
from taskloom.engine.client import AsyncEngineClient
from taskloom.server.launch import ServerThread, free_port, uvicorn_config

MODEL = "smol"


def start_server(llm: LLM, **kwargs: object) -> ServerThread:
    """A server on `llm`'s engine, stepping in a thread of this process (so tests can look
    at the engine's internals); `loras` names the adapters requests may pick."""
    client = AsyncEngineClient(llm.engine, kwargs.get("loras"))  # type: ignore[arg-type]
    config = uvicorn_config(client, MODEL, "127.0.0.1", free_port(),
                            kwargs.get("api_key"), kwargs.get("max_queue"),  # type: ignore[arg-type]
                            shutdown_grace=5, log_level="warning",
                            tool_call_parser=kwargs.get("tool_call_parser"))  # type: ignore[arg-type]
    return ServerThread(config).start()


def wait_idle(llm: LLM, timeout: float = 30.0) -> None:
    """Wait until the engine has nothing left and every KV block is back in the pool."""
    sched = llm.engine.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (not llm.engine.has_unfinished and not sched.has_unfinished
                and sched.kv.num_free_blocks == sched.kv.num_blocks):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {sched.num_running} running, {sched.num_waiting} "
                         f"waiting, {sched.kv.num_blocks - sched.kv.num_free_blocks} blocks held")


@pytest.fixture(scope="session")
def server_llm() -> LLM:
    return LLM(max_num_seqs=16, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="session")
def server(server_llm: LLM) -> Iterator[ServerThread]:
    st = start_server(server_llm)
    yield st
    st.stop()


@pytest.fixture(scope="session")
def oracle() -> LLM:
    """A second engine on the same model: what LLM.generate gives for the same request."""
    return LLM(max_num_seqs=16, kv_cache_memory_gb=0.25)


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(autouse=True)
def _pool_full_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("server_llm", "oracle", "guarded_llm"):
        if name in request.fixturenames:
            wait_idle(request.getfixturevalue(name))
