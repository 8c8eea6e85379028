"""Durable offline batch jobs in OpenAI's Batch API format: `taskloom batch INPUT OUTPUT`.

Each INPUT line is `{"custom_id", "method": "POST", "url", "body"}` with url
`/v1/completions` or `/v1/chat/completions`. The body is checked exactly as the server checks
it (the same pydantic models, sampling values, prompt encoding, chat template, context length)
and answered with the body the server returns for a non-streamed request. `body.model` is
required, as in OpenAI's format, but any name is accepted: a line runs on the loaded LoRA
adapter its `model` names (or the merge its `merged_adapters` asks for), else on the base
model, and the response's `model` is that adapter's name or the served name
(`--served-model-name`).

OUTPUT lines follow OpenAI's batch output, in completion order:

    {"id": "batch_req_<hex>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": "<hex>", "body": <completion>}}

A request the endpoint refuses is answered as OpenAI answers it, an HTTP error in `response`:
`status_code` 400 and the server's error body (`{"error": {message, type, param, code}}`);
one the engine took but could not serve (its adapter's files can no longer be read) gets the
server's 500 the same way.
A line that never makes a request (not JSON, no custom_id, a custom_id already used on an
earlier line, method not POST, an unknown url, no body object) gets `response: null` and
`error: {"code", "message", "line"}`, `line` being its 1-based INPUT line number (the field
OpenAI's own batch errors carry) so that a rerun recognises it. The job goes on either way.

Durability: every line is written whole and flushed to the OS as soon as its request
finishes, so a killed process (Ctrl-C, SIGKILL, out of memory) loses nothing it wrote. Only an
OS crash or power cut can lose what the kernel has not put on disk yet: `os.fsync` runs with
the first line written `fsync_interval` (1 s) after the previous sync, and at the end, rather
than per line, which would cost a disk flush (milliseconds) per request for nothing against a
killed process; what a crash loses, the rerun recomputes. A rerun reads OUTPUT first, cuts a
torn last line, and skips every custom_id (and error line) already there, so an interrupted
job finishes without losing or duplicating a line. A job holds an exclusive lock on OUTPUT
from the start, so a second run on the same OUTPUT meanwhile is refused at once instead of
answering the same lines again.

The engine keeps a bounded window of sequences in flight (`max_in_flight`, by default four
times `max_num_seqs`), refilled as requests finish from a chunk of at most twice as many
checked lines read ahead, so memory stays flat however long INPUT is. Unless the LLM was built
with `prefix_aware_order=False` (`--no-prefix-aware-order`), each chunk is admitted in token
order of its prompts, so lines that share a prefix run together while it is cached.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from tqdm.auto import tqdm

from taskloom.lora.request import LoRARequest
from taskloom.outputs import OutputKind, RequestOutput
from taskloom.server.chat import chat_body, prepare_chat
from taskloom.server.completions import completion_body, prepare_completion
from taskloom.server.errors import APIError, bad_request, validation_message
from taskloom.server.protocol import ChatCompletionRequest, CompletionRequest
from taskloom.server.serving import (ModelContext, PreparedRequest, new_response_id, refused,
                                     request_failed)
from taskloom.server.tool_parsers import ToolCallParser

if TYPE_CHECKING:
    from taskloom.api import LLM

logger = logging.getLogger(__name__)


class BatchFileError(ValueError):
    """INPUT or OUTPUT cannot be used, so the whole job cannot run."""


@dataclass(frozen=True)
class Endpoint:
    """One url a batch line may name: its body model, checks, and response builder."""

    model: type[BaseModel]
    prepare: Callable[[ModelContext, Any], PreparedRequest]
    build: Callable[[ModelContext, str, int, Any, list[RequestOutput]], dict[str, Any]]
    id_prefix: str


def _chat_body(ctx: ModelContext, response_id: str, created: int, body: Any,
               final: list[RequestOutput]) -> dict[str, Any]:
    return chat_body(ctx, response_id, created, body, final[0])   # a chat has one prompt


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/completions": Endpoint(CompletionRequest, prepare_completion, completion_body, "cmpl"),
    "/v1/chat/completions": Endpoint(ChatCompletionRequest, prepare_chat, _chat_body,
                                     "chatcmpl"),
}


class LineError(Exception):
    """A line that makes no request: answered with `error` and its line number."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclass
class BatchSummary:
    """What a run did: lines written (errors among them), lines skipped as already in OUTPUT."""

    total: int
    done: int = 0
    errors: int = 0
    skipped: int = 0
    output_tokens: int = 0
    elapsed: float = 0.0
    interrupted: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class _Resume:
    """What OUTPUT already answers: custom_ids, and INPUT line numbers of error lines."""

    custom_ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    records: int = 0

    def covers(self, line: int, custom_id: str | None) -> bool:
        return line in self.lines or (custom_id is not None and custom_id in self.custom_ids)


@dataclass(order=True)
class _Staged:
    """A checked line waiting for room in the engine, ordered by `key` then INPUT line."""

    key: tuple[int, list[int]]  # (adapter id, first prompt's ids) with prefix-aware order
    line: int
    custom_id: str = field(compare=False)
    endpoint: Endpoint = field(compare=False)
    body: Any = field(compare=False)
    prepared: PreparedRequest = field(compare=False)
    lora: LoRARequest | None = field(compare=False)


@dataclass
class _Job:
    """One line's request in flight: one engine request per prompt."""

    custom_id: str
    endpoint: Endpoint
    body: Any
    response_id: str
    created: int
    num_seqs: int
    final: list[RequestOutput | None]
    remaining: int


def _record(custom_id: str | None, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": response, "error": error}


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}


class _Output:
    """OUTPUT opened for appending: each line written whole and flushed at once, fsync'ed at
    most every `fsync_interval` seconds and on close."""

    def __init__(self, path: str, fsync_interval: float) -> None:
        self._f = open(path, "a", encoding="utf-8")
        self._interval = fsync_interval
        self._synced = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if time.monotonic() - self._synced >= self._interval:
            self._sync()

    def _sync(self) -> None:
        os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        self._f.flush()
        self._sync()
        self._f.close()


def _count_lines(path: str) -> int:
    """Non-blank lines of INPUT (blank lines are ignored)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for raw in f if raw.strip())
    except FileNotFoundError:
        raise BatchFileError(f"INPUT {path} does not exist") from None
    except OSError as e:
        raise BatchFileError(f"cannot read INPUT {path}: {e.strerror or e}") from None


def _input_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of every non-blank INPUT line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def _check_output(output_path: str, input_path: str) -> None:
    if os.path.exists(output_path) and os.path.samefile(output_path, input_path):
        raise BatchFileError(f"OUTPUT {output_path} is INPUT itself: give another file")
    try:
        with open(output_path, "ab"):
            pass
    except OSError as e:
        raise BatchFileError(f"cannot write OUTPUT {output_path}: {e.strerror or e}") from None


def _lock_output(path: str) -> IO[bytes]:
    """OUTPUT opened and locked (flock, exclusive) for this job's lifetime, so that a second
    run on the same OUTPUT, which would answer the same lines again in between this one's,
    fails at once instead. The kernel drops the lock when the process dies, even by SIGKILL."""
    f = open(path, "ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BatchFileError(f"OUTPUT {path} is being written by another taskloom batch run: "
                             f"wait for it to end (or stop it), or give another OUTPUT") from None
    return f


def _read_output(path: str) -> _Resume:
    """What OUTPUT already answers. A last line without its newline (the process was killed
    while writing it) is cut off the file, so appending starts on a fresh line."""
    resume = _Resume()
    with open(path, "r+b") as f:
        offset = 0
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                logger.warning("%s: dropping the unfinished last line %d (%d bytes); its "
                               "request runs again", path, number, len(raw))
                f.truncate(offset)
                break
            offset += len(raw)
            if raw.strip():
                _note_answered(resume, raw, path, number)
    return resume


def _note_answered(resume: _Resume, raw: bytes, path: str, number: int) -> None:
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "custom_id" not in record:
        raise BatchFileError(f"OUTPUT {path} line {number} is not a batch output line, so the "
                             f"job cannot resume from this file: give another OUTPUT")
    error = record.get("error")
    line = error.get("line") if isinstance(error, dict) else None
    if isinstance(line, int):
        resume.lines.add(line)
    elif isinstance(record["custom_id"], str):
        resume.custom_ids.add(record["custom_id"])
    resume.records += 1


class BatchJob:
    """One batch job, INPUT answered into OUTPUT. Constructing it checks both files and reads
    what OUTPUT already answers (raising BatchFileError when the job cannot run), so a CLI
    fails before loading a model; `run` then answers every other line, once."""

    def __init__(self, input_path: str, output_path: str, fsync_interval: float = 1.0) -> None:
        self.input_path, self.output_path = input_path, output_path
        self.fsync_interval = fsync_interval
        self.total = _count_lines(input_path)
        _check_output(output_path, input_path)
        self._lock: IO[bytes] | None = _lock_output(output_path)
        try:
            self._resume = _read_output(output_path)
        except BaseException:
            self.close()
            raise
        self._stop = threading.Event()
        self.summary = BatchSummary(self.total)

    @property
    def num_answered(self) -> int:
        """INPUT lines answered in OUTPUT: before the run plus written by it."""
        return self._resume.records + self.summary.done

    def close(self) -> None:
        """Let go of OUTPUT (its lock); `run` does this when it returns."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def request_stop(self) -> None:
        """Stop soon (safe from a signal handler or another thread): the current engine step
        ends, requests in flight are aborted, and OUTPUT keeps every line written so far."""
        self._stop.set()

    def run(self, llm: LLM, model_name: str, max_in_flight: int | None = None,
            progress: bool = True, tool_call_parser: ToolCallParser | None = None
            ) -> BatchSummary:
        """Answer every line not in OUTPUT yet with `llm`, naming the model `model_name` in the
        responses. At most `max_in_flight` sequences (default 4 x max_num_seqs) are in the
        engine at once. A progress bar goes to stderr unless `progress` is false. With
        `tool_call_parser`, chat lines may leave tool_choice "auto", as with the server's
        `--tool-call-parser`. A job runs once: it lets go of OUTPUT when it returns."""
        if self._lock is None:
            raise RuntimeError("this batch job has run (or was closed): make a new BatchJob")
        window = 4 * llm.config.scheduler.max_num_seqs if max_in_flight is None \
            else max_in_flight
        if window < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {window}")
        start = time.monotonic()
        output = _Output(self.output_path, self.fsync_interval)
        bar = tqdm(total=self.total, initial=min(self._resume.records, self.total), unit="req",
                   desc="batch", disable=not progress, mininterval=0.5, dynamic_ncols=True)
        run = _Run(llm, model_name, self._resume, self.summary, output, bar, tool_call_parser)
        lines = _input_lines(self.input_path)
        try:
            self.summary.interrupted = not run.loop(lines, window, self._stop)
        finally:
            run.abort_in_flight()
            lines.close()
            bar.close()
            output.close()
            self.close()
            self.summary.elapsed = time.monotonic() - start
        return self.summary


class _Run:
    """The state of one run: parse and check lines, admit them, write what finishes."""

    def __init__(self, llm: LLM, model_name: str, resume: _Resume, summary: BatchSummary,
                 output: _Output, bar: tqdm, tool_call_parser: ToolCallParser | None) -> None:
        self.engine = llm.engine
        self.llm = llm
        self.prefix_order = llm.prefix_aware_order
        self.ctx = ModelContext(self.engine.tokenizer, model_name,
                                self.engine.scheduler.max_model_len, self.engine.vocab_size,
                                loras=llm.loras if llm.config.lora.enabled else None,
                                tool_call_parser=tool_call_parser)
        self.resume, self.summary, self.output, self.bar = resume, summary, output, bar
        self.staged: list[_Staged] = []                  # checked, not admitted; next last
        self.pending: dict[str, tuple[_Job, int]] = {}   # engine request id -> (job, prompt)
        self.in_flight = 0                               # sequences in the engine
        self.seen: dict[str, int] = {}                   # custom_id -> first INPUT line
        self.start = time.monotonic()

    def loop(self, lines: Iterator[tuple[int, bytes]], window: int,
             stop: threading.Event) -> bool:
        """Run until every line is answered (True) or `stop` is set (False).

        Lines are read and checked a chunk at a time (`2 * window` lines with prefix-aware
        order, else one), and the chunk admitted while fewer than `window` sequences are in
        the engine: in token order of the prompts with prefix-aware order (lines sharing a
        prefix run together and find it cached), else in INPUT order. The next chunk is read
        as soon as the last one is admitted, so the engine never waits for finished ones."""
        chunk = 2 * window if self.prefix_order else 1
        exhausted = False
        while True:
            if not self.staged and not exhausted:
                exhausted = self.read_chunk(lines, chunk, stop)
            while self.staged and self.in_flight < window and not stop.is_set():
                self.submit(self.staged.pop())
            if exhausted and not self.staged and not self.pending:
                return True
            if stop.is_set():
                return False
            if self.pending:
                for out in self.engine.step():
                    if out.finished:
                        self.finish(out)

    def read_chunk(self, lines: Iterator[tuple[int, bytes]], size: int,
                   stop: threading.Event) -> bool:
        """Stage up to `size` more lines, the next to admit last; True when INPUT is done."""
        exhausted = False
        while len(self.staged) < size and not stop.is_set():
            item = next(lines, None)
            if item is None:
                exhausted = True
                break
            self.stage(*item)
        self.staged.sort(reverse=True)
        return exhausted

    def stage(self, line: int, raw: bytes) -> None:
        """Answer a bad line at once, skip an answered one, stage the others."""
        try:
            custom_id, endpoint, body = self.parse(line, raw)
        except LineError as e:
            if line in self.resume.lines:
                self.summary.skipped += 1
            else:
                self.write(_record(e.custom_id, None, {"code": e.code, "message": e.message,
                                                       "line": line}), error=True)
            return
        if self.resume.covers(line, custom_id):
            self.summary.skipped += 1
            return
        try:
            parsed, prepared = self.prepare(endpoint, body)
            lora = self.adapter(parsed)
        except APIError as e:
            self.write_refusal(custom_id, e)
            return
        key = ((0 if lora is None else lora.lora_id, prepared.prompts[0][0])
               if self.prefix_order else (0, []))
        self.staged.append(_Staged(key, line, custom_id, endpoint, parsed, prepared, lora))

    def adapter(self, body: Any) -> LoRARequest | None:
        """The adapter a body names by `model`, or the merge its `merged_adapters` asks for
        (built now, once per recipe); a 400 APIError when that cannot be."""
        lora = self.ctx.adapter(body.model)
        merged = body.merged_adapters
        if merged is None:
            return lora
        if lora is not None or self.ctx.loras is None:
            raise bad_request("merged_adapters needs `model` to name the base model, and "
                              "LoRA support (--enable-lora or --lora)", "merged_adapters")
        try:
            return self.llm.merge_loras(merged.adapters, merged.method, merged.density,
                                        merged.majority_sign_method, merged.seed)
        except (KeyError, ValueError) as e:
            raise bad_request(f"merged_adapters: {e.args[0]}", "merged_adapters") from None

    def parse(self, line: int, raw: bytes) -> tuple[str, Endpoint, dict[str, Any]]:
        """The custom_id, endpoint and body of a line; LineError when it makes no request.
        Every line's custom_id counts for duplicates, whatever else is wrong with it, and the
        first line to use one keeps it, so reruns find the same duplicates."""
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise LineError("invalid_json_line", f"the line is not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise LineError("invalid_json_line", "the line must be a JSON object with "
                                                 "custom_id, method, url and body")
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise LineError("missing_custom_id", "custom_id must be a non-empty string, got "
                                                 f"{json.dumps(custom_id)}")
        if custom_id in self.seen:
            raise LineError("duplicate_custom_id", f"custom_id {custom_id!r} is already used on "
                            f"line {self.seen[custom_id]}: custom_ids must be unique", custom_id)
        self.seen[custom_id] = line
        if record.get("method") != "POST":
            raise LineError("invalid_method", f"method must be \"POST\", got "
                                              f"{json.dumps(record.get('method'))}", custom_id)
        endpoint = ENDPOINTS.get(record.get("url"))  # type: ignore[arg-type]
        if endpoint is None:
            raise LineError("invalid_url", f"url must be one of {', '.join(ENDPOINTS)}, got "
                                           f"{json.dumps(record.get('url'))}", custom_id)
        if not isinstance(record.get("body"), dict):
            raise LineError("invalid_body", "body must be a JSON object: the request body of "
                                            "the url", custom_id)
        return custom_id, endpoint, record["body"]

    def prepare(self, endpoint: Endpoint, raw_body: dict[str, Any]
                ) -> tuple[Any, PreparedRequest]:
        """The body checked as the server checks it; a mistake raises a 400 APIError."""
        try:
            body = endpoint.model.model_validate(raw_body)
        except ValidationError as e:
            message, param = validation_message(e.errors())
            raise bad_request(message, param) from None
        if body.stream:  # type: ignore[attr-defined]
            raise bad_request("stream is not supported in a batch job, which answers each "
                              "request whole: leave stream out or set it to false", "stream")
        return body, endpoint.prepare(self.ctx, body)

    def submit(self, staged: _Staged) -> None:
        """Queue one engine request per prompt, or none (a refusal is answered with a 400)."""
        prepared, num_prompts = staged.prepared, len(staged.prepared.prompts)
        job = _Job(staged.custom_id, staged.endpoint, staged.body,
                   new_response_id(staged.endpoint.id_prefix), int(time.time()),
                   num_prompts * prepared.params.n, [None] * num_prompts, num_prompts)
        added: list[str] = []
        for i, (ids, text) in enumerate(prepared.prompts):
            rid = f"{job.response_id}-{i}"
            try:
                self.engine.add_request(rid, ids, prepared.params, prompt=text,
                                        lora=staged.lora,
                                        output_kind=OutputKind.FINAL_ONLY)
            except ValueError as e:
                for r in added:
                    self.engine.abort(r)
                self.write_refusal(staged.custom_id, refused(i, num_prompts, e))
                return
            added.append(rid)
        for i, rid in enumerate(added):
            self.pending[rid] = (job, i)
        self.in_flight += job.num_seqs

    def finish(self, out: RequestOutput) -> None:
        """File a finished prompt; when its line's last prompt is done, write the line."""
        entry = self.pending.pop(out.request_id, None)
        if entry is None:
            return
        job, i = entry
        job.final[i] = out
        job.remaining -= 1
        self.in_flight -= len(out.outputs)
        if out.error is not None:
            self.fail(job, request_failed(out.error, i, len(job.final)))
            return
        if job.remaining:
            return
        body = job.endpoint.build(self.ctx, job.response_id, job.created, job.body,
                                  job.final)  # type: ignore[arg-type]
        self.summary.output_tokens += body["usage"]["completion_tokens"]
        self.write(_record(job.custom_id, _response(200, body), None))

    def fail(self, job: _Job, error: APIError) -> None:
        """Answer a line whose request the engine could not serve with the server's error,
        and abort its other prompts."""
        seqs_per_prompt = job.num_seqs // len(job.final)
        for k in range(len(job.final)):
            rid = f"{job.response_id}-{k}"
            if self.pending.pop(rid, None) is not None:
                self.engine.abort(rid)
                self.in_flight -= seqs_per_prompt
        self.write_refusal(job.custom_id, error)

    def write_refusal(self, custom_id: str, error: APIError) -> None:
        self.write(_record(custom_id, _response(error.status, error.body()), None), error=True)

    def write(self, record: dict[str, Any], error: bool = False) -> None:
        self.output.write(record)
        self.summary.done += 1
        self.summary.errors += int(error)
        self.bar.update(1)
        elapsed = time.monotonic() - self.start
        if elapsed > 0:
            self.bar.set_postfix_str(f"{self.summary.output_tokens / elapsed:.1f} tok/s",
                                     refresh=False)

    def abort_in_flight(self) -> None:
        """Abort every request still in the engine (a stop, an error): their KV blocks are
        freed and their lines stay unanswered, for a rerun to answer."""
        for rid in self.pending:
            self.engine.abort(rid)
        self.pending.clear()
        self.in_flight = 0
