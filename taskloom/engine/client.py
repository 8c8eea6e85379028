"""Engine clients: the engine core behind an async interface, stepping in a thread of this
process (AsyncEngineClient) or in a process of its own (taskloom.engine.core_process).

The server (and anything else that lives on an asyncio loop) talks to the engine only through
an EngineClient: `generate` (add a request, read its async stream of outputs), `abort`,
`add_lora` / `remove_loras`, `stats` and `info`. Commands go to the engine as small
dataclasses and are applied between steps (EngineLoop), so the event loop never waits for a
step; what the engine says back (outputs, the stats after a step, replies to adds and LoRA
calls, its end) comes as messages the client takes in on the loop (`_receive`). An abort
issued while a step runs takes effect before the next one, so a vanished client's blocks are
free within one engine step. The thread client hands both across in memory; the process
client pickles them through pipes. Pure Python: the core is built elsewhere.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from taskloom.engine.core import EngineCore
from taskloom.lora.registry import LoRARegistry
from taskloom.lora.request import LoRARequest
from taskloom.outputs import OutputKind, RequestOutput, merge_deltas
from taskloom.sampling_params import SamplingParams
from taskloom.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine takes after every step (sent on when it changed)."""

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


    @classmethod
    def of(cls, core: EngineCore) -> EngineStats:
        sched = core.scheduler
        cache, spec = sched.kv.stats, sched.spec_stats
        return cls(sched.num_running, sched.num_waiting, sched.kv.usage, sched.num_preemptions,
                   cache.queries, cache.hits, spec.num_drafts, spec.num_draft_tokens,
                   spec.num_accepted_tokens, tuple(spec.num_accepted_tokens_per_pos))


@dataclass(frozen=True)
class EngineInfo:
    """What a server needs to know of the engine it talks to, fixed once it is built."""

    tokenizer: Tokenizer | None
    max_model_len: int
    vocab_size: int
    # the adapters loaded when the engine was built, by name (None: no LoRA support)
    loras: LoRARegistry | None = None
    runs_on: str | None = None      # the model's dtype and device ("bfloat16 on cpu")

    @classmethod
    def of(cls, core: EngineCore, loras: LoRARegistry | None = None) -> EngineInfo:
        return cls(core.tokenizer, core.scheduler.max_model_len, core.vocab_size, loras,
                   core.runs_on)


class EngineDeadError(RuntimeError):
    """The engine hit an unexpected error (or its process died) and stopped; every request
    fails with it."""


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


# ----- commands to the engine, applied between two steps ---------------------------------------
@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    lora: LoRARequest | None = None
    output_kind: OutputKind = OutputKind.CUMULATIVE


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class AddLoRA:
    call_id: int
    lora: LoRARequest


@dataclass
class RemoveLoRAs:
    call_id: int
    lora_ids: list[int]


Command = AddRequest | AbortRequest | AddLoRA | RemoveLoRAs | None    # None: shut down


# ----- what the engine says back ---------------------------------------------------------------
@dataclass
class Added:
    """An AddRequest was applied: queued (error None) or refused."""

    request_id: str
    error: Exception | None     # ValueError: refused; EngineDeadError: the engine stopped
    stats: EngineStats          # the stats with the request counted as waiting


@dataclass
class Outputs:
    """A step's outputs, and the stats after it if they changed (else None)."""

    outputs: list[RequestOutput]
    stats: EngineStats | None


@dataclass
class CallDone:
    call_id: int
    error: Exception | None


@dataclass
class Stopped:
    """The engine loop ended: shut down as asked (error None) or failed with `error`."""

    error: str | None = None


Message = Added | Outputs | CallDone | Stopped


class EngineLoop:
    """The engine side of a client: apply the commands that came in, step while anything is
    unfinished (wait for a command while nothing is), and `send` what happened. Ends at a
    None command, aborting whatever is unfinished; an error in a step (a bug) ends it too,
    failing every request rather than the process."""

    def __init__(self, core: EngineCore, commands: queue.SimpleQueue[Command],
                 send: Callable[[Message], None]) -> None:
        self.core = core
        self.commands = commands
        self.send = send
        self._stats = EngineStats.of(core)

    def run(self) -> None:
        error: str | None = None
        try:
            while self._apply_commands(block=not self.core.has_unfinished):
                if not self.core.has_unfinished:
                    continue
                outputs = self.core.step()
                stats = self._new_stats()
                if outputs or stats is not None:
                    self.send(Outputs(outputs, stats))
        except BaseException as e:  # a bug in a step: fail every request, keep the server up
            logger.exception("engine step failed; failing every request")
            error = f"the engine failed: {e}"
        finally:
            self._shut_down(error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply the commands queued (waiting for one if `block`); False at a shutdown."""
        while True:
            try:
                cmd = self.commands.get() if block else self.commands.get_nowait()
            except queue.Empty:
                break
            block = False
            if cmd is None:
                return False
            self._apply(cmd)
        stats = self._new_stats()
        if stats is not None:
            self.send(Outputs([], stats))
        return True

    def _apply(self, cmd: AddRequest | AbortRequest | AddLoRA | RemoveLoRAs) -> None:
        if isinstance(cmd, AbortRequest):
            self.core.abort(cmd.request_id)
        elif isinstance(cmd, AddRequest):
            error = None
            try:
                self.core.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params,
                                      prompt=cmd.prompt, lora=cmd.lora,
                                      output_kind=cmd.output_kind)
            except ValueError as e:
                error = e
            self._stats = EngineStats.of(self.core)
            self.send(Added(cmd.request_id, error, self._stats))
        else:
            try:
                if isinstance(cmd, AddLoRA):
                    self.core.add_lora(cmd.lora)
                else:
                    for lora_id in cmd.lora_ids:
                        self.core.remove_lora(lora_id)
            except Exception as e:    # the caller's error (e.g. a bad adapter), not the engine's
                self.send(CallDone(cmd.call_id, e))
            else:
                self.send(CallDone(cmd.call_id, None))

    def _new_stats(self) -> EngineStats | None:
        stats = EngineStats.of(self.core)
        if stats == self._stats:
            return None
        self._stats = stats
        return stats

    def _shut_down(self, error: str | None) -> None:
        """On the way out: refuse the commands still queued, abort what runs, say so."""
        refusal = EngineDeadError(error or "the engine is shut down")
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, AddRequest):
                self.send(Added(cmd.request_id, refusal, self._stats))
            elif isinstance(cmd, (AddLoRA, RemoveLoRAs)):
                self.send(CallDone(cmd.call_id, refusal))
        self.core.abort_all()
        self.send(Outputs([], EngineStats.of(self.core)))
        self.send(Stopped(error))


class EngineClient:
    """The event-loop side of an engine, whichever way it is reached: requests' streams, the
    adds and LoRA calls awaiting their reply, the latest stats. Subclasses say how commands
    travel (`_send`) and start and stop the engine; what comes back goes to `_receive`, on
    the loop."""

    def __init__(self, info: EngineInfo) -> None:
        self.info = info
        self.stats = EngineStats()
        self.error: EngineDeadError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, OutputStream] = {}
        self._adds: dict[str, tuple[asyncio.Future, int]] = {}   # id -> (reply, sequences)
        self._pending_seqs = 0    # the sequences of those adds
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._stopped = False     # the engine said it stopped; nothing more will come

    # ----- what a transport provides ---------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the engine (its thread or process) is up."""
        raise NotImplementedError

    def _send(self, command: Command) -> None:
        raise NotImplementedError

    # ----- the interface ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.running and self.error is None and not self._stopped

    @property
    def num_queued(self) -> int:
        """Sequences waiting for admission, counting adds the engine has not yet taken in
        (an add stops counting here only once the stats that came with its reply count it)."""
        return self.stats.num_waiting + self._pending_seqs

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
        self._check_alive()
        if request_id in self._streams or request_id in self._adds:
            raise ValueError(f"request id {request_id!r} is already in use")
        if stream is None:
            stream = OutputStream()
        stream.track(request_id, output_kind)
        self._streams[request_id] = stream
        reply = asyncio.get_running_loop().create_future()
        self._adds[request_id] = (reply, params.n)
        self._pending_seqs += params.n
        self._send(AddRequest(request_id, list(prompt_token_ids), params, prompt, lora,
                              output_kind))
        try:
            await reply
        except ValueError:                   # the engine refused it: nothing was queued
            self._streams.pop(request_id, None)
            raise
        except BaseException:                # cancelled while the add was in flight
            self._forget_add(request_id)
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; its blocks are freed before the next step."""
        self._streams.pop(request_id, None)
        if not self._stopped:
            self._send(AbortRequest(request_id))

    async def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter into the engine (ValueError if it cannot be served)."""
        await self._call(lambda call_id: AddLoRA(call_id, lora))

    async def remove_loras(self, lora_ids: list[int]) -> None:
        """Unload adapters (requests already queued with them still finish)."""
        await self._call(lambda call_id: RemoveLoRAs(call_id, list(lora_ids)))

    async def _call(self, command: Callable[[int], AddLoRA | RemoveLoRAs]) -> None:
        self._check_alive()
        call_id = next(self._call_ids)
        reply = asyncio.get_running_loop().create_future()
        self._calls[call_id] = reply
        self._send(command(call_id))
        try:
            await reply
        finally:
            self._calls.pop(call_id, None)

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineDeadError("the engine is not running"
                                  + (f": {self.error}" if self.error else ""))

    # ----- on the loop: what the engine said -------------------------------------------------
    def _receive(self, message: Message) -> None:
        if isinstance(message, Outputs):
            if message.stats is not None:
                self.stats = message.stats
            for out in message.outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)
        elif isinstance(message, Added):
            self.stats = message.stats
            reply = self._forget_add(message.request_id)
            if reply is not None and not reply.done():
                if message.error is not None:
                    reply.set_exception(message.error)
                else:
                    reply.set_result(None)
        elif isinstance(message, CallDone):
            call = self._calls.get(message.call_id)
            if call is not None and not call.done():
                if message.error is not None:
                    call.set_exception(message.error)
                else:
                    call.set_result(None)
        else:
            self._end(message.error)

    def _forget_add(self, request_id: str) -> asyncio.Future | None:
        """Stop waiting for an add's reply; the reply, if it was still awaited."""
        reply, n = self._adds.pop(request_id, (None, 0))
        self._pending_seqs -= n
        return reply

    def _end(self, error: str | None) -> None:
        """The engine is gone (shut down, or `error`): fail whatever still waits on it."""
        self._stopped = True
        if error is not None and self.error is None:
            self.error = EngineDeadError(error)
        dead = self.error or EngineDeadError("the engine was shut down")
        for stream in {id(q): q for q in self._streams.values()}.values():
            stream.put_nowait(dead)
        self._streams.clear()
        for reply in [r for r, _ in self._adds.values()] + list(self._calls.values()):
            if not reply.done():
                reply.set_exception(dead)
        self._adds.clear()
        self._pending_seqs = 0


class AsyncEngineClient(EngineClient):
    """The engine core stepping in a daemon thread of this process (commands through a
    queue, messages back with `call_soon_threadsafe`)."""

    def __init__(self, core: EngineCore, loras: LoRARegistry | None = None) -> None:
        super().__init__(EngineInfo.of(core, loras))
        self.core = core
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; what it says is taken in on `loop`."""
        self._loop = loop
        engine = EngineLoop(self.core, self._commands, self._deliver)
        self._thread = threading.Thread(target=engine.run, name="taskloom-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort everything still running and stop the engine thread."""
        if self._thread is None:
            return
        self._commands.put(None)
        self._thread.join()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _send(self, command: Command) -> None:
        self._commands.put(command)

    def _deliver(self, message: Message) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._receive, message)
