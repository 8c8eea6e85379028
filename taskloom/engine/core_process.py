"""The engine core in a process of its own, behind the same EngineClient as the thread.

Why: a server's event loop spends tens of microseconds of CPU per streamed token (encoding
and sending each chunk; `benchmarks/serve_host.py`), and an engine thread in the same process
needs the same interpreter lock for its own host work between device steps (scheduling, the
batch, taking tokens in, detokenizing). At a full batch the loop's share is larger than a
GPU step is long, so in one process the device waits for the lock. Split in two, each
process has its own lock and its own core: vLLM's V1 engine core and SGLang's scheduler
process are split off from their API servers for the same reason.

How: the server's process spawns the engine's (`ProcessEngineClient.launch`, with a
picklable function that builds the EngineCore there) and waits until it is built. Commands
(taskloom.engine.client) go down one pipe, pickled; in the engine's process a reader thread
queues them for the EngineLoop, which steps exactly as it does in a thread, and a writer
thread pickles what it sends back up the other pipe, several messages at a time, while the
loop goes on with the next step. Outputs travel as plain tuples, without their prompts (the
client has them; they are put back on arrival). In the server's process a reader thread takes
the messages in and hands them to the event loop.

Lifetimes: the engine's process ignores SIGINT and SIGTERM (a terminal's Ctrl-C reaches the
whole process group; the server decides when the engine stops, after its graceful shutdown)
and stops when told, or when its command pipe closes because the server's process is gone.
If the engine's process dies, every request fails with EngineDeadError naming how it ended,
and the server stays up to say so (/health answers 503). Pure Python: what builds the core
(and imports torch) is the caller's function, run only in the engine's process.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from taskloom.engine.client import (AbortRequest, Added, AddRequest, Command, EngineClient,
                                    EngineInfo, EngineLoop, Message, Outputs, Stopped)
from taskloom.engine.core import EngineCore
from taskloom.lora.registry import LoRARegistry
from taskloom.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)

# Builds the engine in its process: the core, and the registry of the adapters it loaded.
EngineBuilder = Callable[[], tuple[EngineCore, LoRARegistry | None]]


@dataclass
class _Ready:
    info: EngineInfo


@dataclass
class _StartFailed:
    error: Exception


# An output on the wire: (request id, finished, error, prompt logprobs, completions), each
# completion the fields of a CompletionOutput in order. Tuples pickle about four times faster
# than the dataclasses, and the prompt (the client's own) stays behind.
_WireOutput = tuple[str, bool, str | None, list | None, list[tuple]]


def _to_wire(out: RequestOutput) -> _WireOutput:
    return (out.request_id, out.finished, out.error, out.prompt_logprobs,
            [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
              c.text_delta, c.token_ids_delta) for c in out.outputs])


class ProcessEngineClient(EngineClient):
    """An EngineClient whose engine core runs in a spawned process (see the module)."""

    def __init__(self, info: EngineInfo, process: BaseProcess, commands: Connection,
                 messages: Connection) -> None:
        super().__init__(info)
        self._process = process
        self._commands = commands
        self._messages = messages
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = False
        # request id -> (prompt, prompt ids), put back on the outputs that arrive without them
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}

    @classmethod
    def launch(cls, build: EngineBuilder, log_level: int | str = logging.INFO,
               poll_s: float = 0.5) -> ProcessEngineClient:
        """Spawn the engine's process, build the engine there with `build`, and return once
        it is ready. Raises what the build raised (ValueError, FileNotFoundError: the
        configuration's fault), or RuntimeError if the process died without a word."""
        ctx = multiprocessing.get_context("spawn")     # never fork a process that holds CUDA
        commands_out, commands_in = ctx.Pipe(duplex=False)
        messages_out, messages_in = ctx.Pipe(duplex=False)
        process = ctx.Process(target=run_engine_process, name="taskloom-engine",
                              args=(build, commands_out, messages_in, log_level))
        process.start()
        commands_out.close()        # the engine's ends: its exit then reads as EOF here
        messages_in.close()
        try:
            first = _first_message(messages_out, process, poll_s)
        except BaseException:
            _end_process(process, commands_in)
            raise
        if isinstance(first, _StartFailed):
            _end_process(process, commands_in)
            raise first.error
        logger.info("engine core running in process %d", process.pid)
        return cls(first.info, process, commands_in, messages_out)

    # ----- the transport ---------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take what the engine says in on `loop` from now on."""
        self._loop = loop
        self._reader = threading.Thread(target=self._read, name="taskloom-engine-reader",
                                        daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything still running and end the engine's process (killed if it has not
        ended after `timeout` seconds)."""
        if self._stopping:
            return
        self._stopping = True
        self._send(None)
        self._process.join(timeout)
        _end_process(self._process, self._commands)
        if self._reader is not None:
            self._reader.join(timeout)
        self._messages.close()

    @property
    def running(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _send(self, command: Command) -> None:
        if isinstance(command, AddRequest):
            self._prompts[command.request_id] = (command.prompt, command.prompt_token_ids)
        elif isinstance(command, AbortRequest):
            self._prompts.pop(command.request_id, None)
        try:
            with self._send_lock:
                self._commands.send(command)
        except OSError:     # the process is gone; the reader reports how it ended
            pass

    def _read(self) -> None:
        """The reader thread: messages in, decoded, handed to the loop in the batches they
        came in."""
        while True:
            try:
                batch: list[Message] = self._messages.recv()
            except (EOFError, OSError):
                break
            for message in batch:
                if isinstance(message, Outputs):
                    message.outputs = [self._from_wire(w) for w in message.outputs]
            self._deliver(batch)
        if not self._stopping:      # not asked to stop: the process died
            self._process.join(5.0)
            self._deliver([_death(self._process.exitcode)])
        self._loop_call(self._prompts.clear)    # no output of theirs will come now

    def _from_wire(self, w: _WireOutput) -> RequestOutput:
        rid, finished, error, prompt_logprobs, completions = w
        prompt, ids = (self._prompts.pop(rid, (None, [])) if finished
                       else self._prompts.get(rid, (None, [])))
        return RequestOutput(rid, prompt, ids, [CompletionOutput(*c) for c in completions],
                             finished, prompt_logprobs, error)

    def _deliver(self, batch: list[Message]) -> None:
        self._loop_call(self._receive_batch, batch)

    def _loop_call(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _receive_batch(self, batch: list[Message]) -> None:
        for message in batch:
            self._receive(message)

    def _receive(self, message: Message) -> None:
        if isinstance(message, Added) and message.error is not None:
            self._prompts.pop(message.request_id, None)
        super()._receive(message)


def _first_message(conn: Connection, process: BaseProcess, poll_s: float) -> _Ready | _StartFailed:
    """Wait for the engine's process to say it is built (or failed); it may take minutes."""
    while not conn.poll(poll_s):
        if not process.is_alive():
            process.join()
            raise RuntimeError(f"the engine process {_ended(process.exitcode)} before its "
                               f"engine was built (see its log above)")
    try:
        return conn.recv()
    except EOFError:
        process.join(5.0)
        raise RuntimeError(f"the engine process {_ended(process.exitcode)} before its engine "
                           f"was built (see its log above)") from None


def _ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


def _death(exitcode: int | None) -> Message:
    return Stopped(f"the engine process {_ended(exitcode)}")


def _end_process(process: BaseProcess, commands: Connection, grace_s: float = 5.0) -> None:
    """Close the command pipe (the engine stops at its EOF) and make sure the process ends."""
    commands.close()
    process.join(grace_s)
    if process.is_alive():
        logger.warning("the engine process did not stop; killing it")
        process.kill()
        process.join()


# ----- in the engine's process -------------------------------------------------------------------
def run_engine_process(build: EngineBuilder, commands: Connection, messages: Connection,
                       log_level: int | str) -> None:
    """The engine process's main: build, say so, then run the EngineLoop until told to stop
    or until the command pipe closes."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        core, loras = build()
    except Exception as e:
        logger.exception("building the engine failed")
        messages.send(_StartFailed(_portable(e)))
        return
    messages.send(_Ready(EngineInfo.of(core, loras)))
    inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
    outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
    threading.Thread(target=_read_commands, args=(commands, inbox), name="taskloom-commands",
                     daemon=True).start()
    writer = threading.Thread(target=_write_messages, args=(outbox, messages),
                              name="taskloom-messages")
    writer.start()
    EngineLoop(core, inbox, outbox.put).run()
    outbox.put(None)
    writer.join()


def _read_commands(conn: Connection, inbox: queue.SimpleQueue[Command]) -> None:
    """Keep the command pipe drained (a burst of requests never blocks the server's sends
    while a step runs); its EOF (the server's process is gone) reads as a shutdown."""
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            inbox.put(None)
            return
        inbox.put(command)
        if command is None:
            return


def _write_messages(outbox: queue.SimpleQueue[Message | None], conn: Connection) -> None:
    """Send what the loop says, everything queued at once, until None."""
    while True:
        batch = [outbox.get()]
        while True:
            try:
                batch.append(outbox.get_nowait())
            except queue.Empty:
                break
        done = any(m is None for m in batch)
        wire = [_wire(m) for m in batch if m is not None]
        try:
            if wire:
                conn.send(wire)
        except OSError:      # the server's process is gone; the command pipe's EOF stops us
            pass
        if done:
            conn.close()
            return


def _wire(message: Message) -> Message:
    if isinstance(message, Outputs) and message.outputs:
        return Outputs([_to_wire(o) for o in message.outputs],  # type: ignore[misc]
                       message.stats)
    return message


def _portable(error: Exception) -> Exception:
    """The build's error as one that pickles and reads the same on the other side."""
    for kind in (FileNotFoundError, ValueError):
        if isinstance(error, kind):
            return kind(str(error))
    return RuntimeError(f"building the engine failed: {type(error).__name__}: {error}")

