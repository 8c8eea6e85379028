"""`taskloom serve` as a real process: SIGTERM lets in-flight requests finish within the grace
period, refuses new connections, aborts what outlives the grace, and exits 0, its engine's
process with it; a server killed outright leaves no engine process behind either."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from taskloom.runtime.dtypes import resolve_dtype
from taskloom.server.launch import free_port


@contextmanager
def serve_process(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "taskloom.cli", "serve", "--port", str(port),
           "--served-model-name", "smol", "--kv-cache-memory-gb", "0.25", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def engine_pid(proc: subprocess.Popen) -> int:
    """The pid of the server's engine process (its spawned child; multiprocessing's resource
    tracker is the other)."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    spawned = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                spawned.append(child)
    (engine,) = spawned
    return engine


def gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether process `pid` has ended (and been reaped) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True     # ended; its parent (gone too) leaves init to reap it
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _stream(url: str, max_tokens: int, events: list[str], started: threading.Event) -> None:
    body = {"model": "smol", "prompt": "Count:", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()
    except httpx.TransportError as e:
        events.append(f"transport error: {e}")
    started.set()


def _stream_started(url: str, max_tokens: int) -> tuple[threading.Thread, list[str]]:
    """A streaming request in a thread, returned once its first event arrived."""
    events: list[str] = []
    started = threading.Event()
    t = threading.Thread(target=_stream, args=(url, max_tokens, events, started))
    t.start()
    assert started.wait(60)
    return t, events


def test_sigterm_lets_inflight_finish() -> None:
    with serve_process("--shutdown-timeout", "60") as (proc, url):
        engine = engine_pid(proc)
        with open(f"/proc/{proc.pid}/maps") as f:     # torch lives in the engine's process
            assert "libtorch" not in f.read()
        t, events = _stream_started(url, 60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            httpx.post(url + "/v1/completions", json={"model": "smol", "prompt": "x"},
                       timeout=5)
            refused = False
        except httpx.TransportError:
            refused = True
        t.join(120)
        assert proc.wait(60) == 0
        # the banner says what --dtype auto (the default) chose in the engine's process
        auto = resolve_dtype("auto", "cpu")
        assert f"serving 'smol' ({auto} on cpu) at http://127.0.0.1:" in proc.stdout.read()
        assert refused, "a new request was accepted after SIGTERM"
        assert gone(engine), "the engine process outlived the server"
    assert events[-1] == "data: [DONE]", events[-3:]
    tokens = [json.loads(e[6:]) for e in events[:-1]]
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"


def test_sigterm_grace_expires() -> None:
    with serve_process("--shutdown-timeout", "1") as (proc, url):
        t, events = _stream_started(url, 5000)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        t.join(30)
    assert "data: [DONE]" not in events


def test_a_killed_server_leaves_no_engine_process() -> None:
    with serve_process() as (proc, url):
        engine = engine_pid(proc)
        t, _ = _stream_started(url, 5000)
        proc.kill()
        proc.wait()
        assert gone(engine), "the engine process outlived its killed server"
        t.join(30)
