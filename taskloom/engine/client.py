"""AsyncEngineClient: the engine core stepping in a background thread, behind an async interface.

The server (and anything else that lives on an asyncio loop) talks to the engine only through
`generate` (add a request, read its async stream of outputs), `abort` and `stats`. Commands go
to the engine thread through a queue and are applied between steps, so the event loop never
waits for a step; outputs come back to the loop with `call_soon_threadsafe`. An abort issued
while a step runs takes effect before the next one, so a vanished client's blocks are free
within one engine step. Pure Python: the core is built elsewhere and passed in.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from taskloom.engine.core import EngineCore
from taskloom.lora.request import LoRARequest
from taskloom.outputs import OutputKind, RequestOutput, merge_deltas
from taskloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken by the engine thread after every step."""

    num_running: int = 0          # sequences scheduled in the running batch
    num_waiting: int = 0          # sequences queued, not yet admitted (incl. preempted)
    kv_cache_usage: float = 0.0   # fraction of KV blocks in use
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0     # of those, tokens whose KV was already cached
    spec_decode_num_drafts: int = 0            # speculative decoding: steps with drafts
    spec_decode_num_draft_tokens: int = 0      # draft tokens run
    spec_decode_num_accepted_tokens: int = 0   # of those, kept
    # of those, per position: the steps that kept a draft at depth d + 1
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()


class EngineDeadError(RuntimeError):
    """The engine thread hit an unexpected error and stopped; every request fails with it."""


class OutputStream:
    """Where the outputs of one or more requests wait for the task that reads them: a FIFO
    queue, except that a request's output arriving while its previous one is still unread
    joins it. A DELTA output is folded into the unread one (`merge_deltas`), a CUMULATIVE one
    takes its place. A reader that falls behind the engine (a server streaming to many
    clients, its event loop busier than a step is long) then takes one output per request
    with every token since its last read, instead of working through a backlog one token at
    a time: its work per step follows the number of streams, not of tokens, and it catches
    up. vLLM's RequestOutputCollector does the same. Exceptions are queued in order and never
    merged. Used on the event loop only."""

    def __init__(self) -> None:
        self._order: deque[str | BaseException] = deque()  # request ids of unread outputs
        self._unread: dict[str, RequestOutput] = {}
        self._kinds: dict[str, OutputKind] = {}
        self._ready = asyncio.Event()

    def track(self, request_id: str, kind: OutputKind) -> None:
        """Say what form `request_id`'s outputs come in (CUMULATIVE if never said)."""
        self._kinds[request_id] = kind

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            rid = item.request_id
            unread = self._unread.get(rid)
            if unread is not None:
                if self._kinds.get(rid) is OutputKind.DELTA:
                    merge_deltas(unread, item)
                else:
                    self._unread[rid] = item
                return
            self._unread[rid] = item
            self._order.append(rid)
        else:
            self._order.append(item)
        self._ready.set()

    def get_nowait(self) -> RequestOutput | BaseException | None:
        """The oldest unread item, or None if there is none."""
        if not self._order:
            return None
        head = self._order.popleft()
        if isinstance(head, BaseException):
            return head
        out = self._unread.pop(head)
        if out.finished:
            self._kinds.pop(head, None)
        return out

    async def get(self) -> RequestOutput | BaseException:
        """Wait for the oldest unread item."""
        while not self._order:
            self._ready.clear()
            await self._ready.wait()
        item = self.get_nowait()
        assert item is not None
        return item

    def __len__(self) -> int:
        return len(self._order)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    done: Future
    lora: LoRARequest | None = None
    output_kind: OutputKind = OutputKind.CUMULATIVE


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run `fn` on the engine thread between steps (adapter loading and unloading)."""

    fn: Callable[[], object]
    done: Future


class AsyncEngineClient:
    """Runs `core.step()` in a daemon thread for as long as any request is unfinished."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, OutputStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending_adds = 0
        self._lock = threading.Lock()
        self.stats = EngineStats()
        self.error: BaseException | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; outputs are delivered on `loop`."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="taskloom-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort everything still running and stop the engine thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(None)
        self._wake.set()
        self._thread.join()
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_queued(self) -> int:
        """Sequences waiting for admission, counting adds the engine has not yet taken in."""
        return self.stats.num_waiting + self._pending_adds

    # ----- requests --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes.

        Raises ValueError (before yielding anything) if the engine refuses the request.
        Leaving the iteration early (a `break`, cancellation, a closed generator) aborts it.
        """
        stream = await self.add(request_id, prompt_token_ids, params, prompt)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                  prompt: str | None = None, stream: OutputStream | None = None,
                  lora: LoRARequest | None = None,
                  output_kind: OutputKind = OutputKind.CUMULATIVE) -> OutputStream:
        """Queue a request in the engine and return the stream its outputs arrive on (`stream`
        if given: several requests may share one and tell outputs apart by id), in the form
        `output_kind` asks for (taskloom.outputs); outputs the reader has not taken yet join
        the next (see OutputStream)."""
        if self.error is not None or self._thread is None:
            raise EngineDeadError("the engine is not running"
                                  + (f": it failed with {self.error}" if self.error else ""))
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if stream is None:
            stream = OutputStream()
        stream.track(request_id, output_kind)
        self._streams[request_id] = stream
        done: Future = Future()
        with self._lock:
            self._pending_adds += params.n
        self._send(_Add(request_id, list(prompt_token_ids), params, prompt, done, lora,
                        output_kind))
        try:
            await asyncio.wrap_future(done)
        except ValueError:                   # the engine refused it: nothing was queued
            self._streams.pop(request_id, None)
            raise
        except BaseException:                # cancelled while the add was in flight
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its blocks are freed before the next step."""
        self._streams.pop(request_id, None)
        self._send(_Abort(request_id))

    async def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` (which may use the engine core) on the engine thread between two steps
        and return its result; its exception is raised here."""
        if self.error is not None or self._thread is None:
            raise EngineDeadError("the engine is not running")
        done: Future = Future()
        self._send(_Call(fn, done))
        return await asyncio.wrap_future(done)

    def _send(self, command: _Add | _Abort | _Call) -> None:
        self._commands.put(command)
        self._wake.set()

    # ----- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if self._stopping:
                    break
                if not self.core.has_unfinished:
                    self._publish_stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.core.step()
                self._publish_stats()
                if outputs:
                    self._deliver(self._dispatch, outputs)
        except BaseException as e:  # a bug in a step: fail every request, keep the server up
            logger.exception("engine step failed; failing every request")
            self.error = e
            self._deliver(self._fail_all, EngineDeadError(f"the engine failed: {e}"))
        finally:
            self._abort_all()

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is None:
                return
            if isinstance(cmd, _Abort):
                self.core.abort(cmd.request_id)
                continue
            if isinstance(cmd, _Call):
                self._run_call(cmd)
                continue
            self._apply_add(cmd)

    def _apply_add(self, cmd: _Add) -> None:
        """Queue a request in the engine. It stops counting as a pending add only once the
        published stats count it as waiting: `num_queued` never misses it in between (it may
        count it twice for that moment, erring toward refusing at the limit)."""
        if cmd.done.set_running_or_notify_cancel():   # else the caller gave up before this
            try:
                self.core.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params,
                                      prompt=cmd.prompt, lora=cmd.lora,
                                      output_kind=cmd.output_kind)
            except ValueError as e:
                cmd.done.set_exception(e)
            else:
                cmd.done.set_result(None)
            self._publish_stats()
        with self._lock:
            self._pending_adds -= cmd.params.n

    @staticmethod
    def _run_call(cmd: _Call) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return
        try:
            result = cmd.fn()
        except Exception as e:      # the caller's error (e.g. a bad adapter), not the engine's
            cmd.done.set_exception(e)
        else:
            cmd.done.set_result(result)

    def _abort_all(self) -> None:
        """On the way out: refuse adds still queued, abort what runs, end every stream."""
        while not self._commands.empty():
            cmd = self._commands.get_nowait()
            if isinstance(cmd, (_Add, _Call)) and cmd.done.set_running_or_notify_cancel():
                cmd.done.set_exception(EngineDeadError("the engine is shut down"))
        self.core.abort_all()
        self._publish_stats()
        if self.error is None:
            self._deliver(self._fail_all, EngineDeadError("the engine was shut down"))

    def _publish_stats(self) -> None:
        sched = self.core.scheduler
        cache, spec = sched.kv.stats, sched.spec_stats
        self.stats = EngineStats(sched.num_running, sched.num_waiting, sched.kv.usage,
                                 sched.num_preemptions, cache.queries, cache.hits,
                                 spec.num_drafts, spec.num_draft_tokens,
                                 spec.num_accepted_tokens,
                                 tuple(spec.num_accepted_tokens_per_pos))

    def _deliver(self, fn: Callable, arg: object) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, arg)

    # ----- on the event loop -----------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in {id(q): q for q in self._streams.values()}.values():
            stream.put_nowait(error)
        self._streams.clear()
