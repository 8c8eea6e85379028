"""`taskloom batch`: OpenAI batch lines answered with the server's bodies, bad lines answered
with errors, and a job that survives SIGKILL and Ctrl-C: rerun, every custom_id once, outputs
equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from taskloom import LLM
from taskloom.batch import BatchFileError, BatchJob
from taskloom.server.chat import chat_body, prepare_chat
from taskloom.server.completions import completion_body, prepare_completion
from taskloom.server.protocol import ChatCompletionRequest, CompletionRequest
from taskloom.server.serving import ModelContext
from taskloom.server.tool_parsers import TOOL_CALL_PARSERS
from tests.e2e.conftest import assert_pool_full

NAME = "smol-batch"
LINE_ERRORS = {"invalid_json_line", "invalid_url", "invalid_method", "missing_custom_id",
               "duplicate_custom_id"}
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
TOPICS = ["the sea", "a cat", "winter", "the moon", "bread", "a river", "mountains", "music"]


def request(custom_id: str | None, url: str, body: dict, method: str = "POST") -> str:
    line: dict[str, Any] = {"method": method, "url": url, "body": body}
    if custom_id is not None:
        line["custom_id"] = custom_id
    return json.dumps(line)


def write_input(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_output(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "OUTPUT ends with a torn line"
    return [json.loads(line) for line in text.splitlines()]


def successes(records: list[dict]) -> dict[str, dict]:
    """custom_id -> response body of every 200 line; each custom_id must appear once."""
    ok = [r for r in records if r["response"] and r["response"]["status_code"] == 200]
    ids = [r["custom_id"] for r in ok]
    assert len(ids) == len(set(ids)), f"a custom_id answered twice: {sorted(ids)}"
    return {r["custom_id"]: r["response"]["body"] for r in ok}


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def story_lines(count: int, max_tokens: int = 8) -> list[str]:
    """Greedy requests, completions and chat alternating."""
    lines = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        if i % 2:
            body = {"model": "gpt-4o-mini", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Say something about {topic}."}]}
            lines.append(request(f"req-{i}", CHAT, body))
        else:
            body = {"model": "gpt-4o-mini", "max_tokens": max_tokens, "temperature": 0,
                    "prompt": f"Story {i}: once, {topic}"}
            lines.append(request(f"req-{i}", CMPL, body))
    return lines


# ----- one run: good lines equal the server's bodies, each bad line one error -----------------
def _good_bodies(llm: LLM) -> dict[str, tuple[str, dict]]:
    ids = llm.tokenizer.encode("The three primary colors are")
    chat = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name two fruits."}]
    return {
        "cmpl-stop": (CMPL, {"model": "anything", "prompt": "The capital of France is",
                             "max_tokens": 12, "temperature": 0, "stop": ["."]}),
        "cmpl-multi": (CMPL, {"model": "gpt-4o-mini", "prompt": ["Once upon a time", "1, 2, 3,"],
                              "max_tokens": 8, "temperature": 0, "n": 2}),
        "cmpl-ids-echo": (CMPL, {"model": NAME, "prompt": ids, "max_tokens": 6,
                                 "temperature": 0, "echo": True}),
        "chat-greedy": (CHAT, {"model": NAME, "messages": chat, "max_tokens": 10,
                               "temperature": 0, "stop": [" and"]}),
        "chat-seeded": (CHAT, {"model": NAME, "messages": chat, "max_completion_tokens": 8,
                               "temperature": 0.8, "seed": 7, "n": 2}),
    }


def _expected(llm: LLM, url: str, raw: dict, got: dict) -> dict:
    """What the server's builder makes of LLM.generate / LLM.chat outputs for the same body."""
    ctx = ModelContext(llm.engine.tokenizer, NAME, llm.engine.scheduler.max_model_len,
                       llm.engine.vocab_size)
    if url == CMPL:
        body = CompletionRequest.model_validate(raw)
        params = prepare_completion(ctx, body).params
        outs = llm.generate(body.prompts(), params, use_tqdm=False)
        return completion_body(ctx, got["id"], got["created"], body, outs)
    chat = ChatCompletionRequest.model_validate(raw)
    out = llm.chat(chat.conversation(), prepare_chat(ctx, chat).params, use_tqdm=False)[0]
    return chat_body(ctx, got["id"], got["created"], chat, out)


def test_batch_answers_good_lines_like_the_server_and_bad_lines_with_errors(
        llm: LLM, tmp_path: Path) -> None:
    good = _good_bodies(llm)
    too_long = "word " * (llm.engine.scheduler.max_model_len + 10)
    base = {"model": NAME, "prompt": "Hi", "max_tokens": 4}
    bad = [  # (line, custom_id, code of an `error` line or param of a 400 response)
        ("{not json", None, "invalid_json_line"),
        (request("bad-url", "/v1/embeddings", {"model": NAME, "input": "x"}), "bad-url",
         "invalid_url"),
        (request("bad-method", CMPL, base, method="GET"), "bad-method", "invalid_method"),
        (request(None, CMPL, base), None, "missing_custom_id"),
        (request("cmpl-stop", CMPL, base), "cmpl-stop", "duplicate_custom_id"),
        (request("bad-temp", CMPL, {**base, "temperature": -1}), "bad-temp", "temperature"),
        (request("bad-type", CMPL, {**base, "max_tokens": "ten"}), "bad-type", "max_tokens"),
        (request("too-long", CHAT, {"model": NAME, "messages": [
            {"role": "user", "content": too_long}]}), "too-long", "messages"),
        (request("streamed", CMPL, {**base, "stream": True}), "streamed", "stream"),
    ]
    lines = [request(cid, url, body) for cid, (url, body) in good.items()]
    lines[2:2] = [b[0] for b in bad] + [""]           # bad lines (and a blank one) in between
    write_input(tmp_path / "in.jsonl", lines)

    job = BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))
    summary = job.run(llm, NAME, progress=False)
    assert (summary.done, summary.errors, summary.skipped) == (len(good) + len(bad), len(bad), 0)
    assert not summary.interrupted and summary.output_tokens > 0
    records = read_output(tmp_path / "out.jsonl")
    assert all(r["id"].startswith("batch_req_") for r in records)

    bodies = successes(records)
    assert set(bodies) == set(good)
    for cid, (url, raw) in good.items():
        assert bodies[cid] == _expected(llm, url, raw, bodies[cid]), cid
        assert bodies[cid]["model"] == NAME
        assert bodies[cid]["id"].startswith("cmpl-" if url == CMPL else "chatcmpl-")
    assert bodies["cmpl-stop"]["choices"][0]["finish_reason"] == "stop"
    assert [c["index"] for c in bodies["cmpl-multi"]["choices"]] == [0, 1, 2, 3]

    refused = _check_error_lines(records, lines, bad)
    assert refused["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"


def _check_error_lines(records: list[dict], lines: list[str],
                       bad: list[tuple[str, str | None, str]]) -> dict[str, dict]:
    """One error line per bad line, of the right kind; returns the 400 lines by custom_id."""
    by_line = {r["error"]["line"]: r for r in records if r["error"]}
    refused = {r["custom_id"]: r for r in records
               if r["response"] is not None and r["response"]["status_code"] != 200}
    assert len(by_line) + len(refused) == len(bad)
    for raw, cid, what in bad:
        if what in LINE_ERRORS:                # no request was made: OpenAI's `error`
            rec = by_line[lines.index(raw) + 1]
            assert rec["response"] is None and rec["error"]["code"] == what, rec
        else:                                  # the endpoint refused it: an HTTP 400 body
            rec = refused[cid]
            assert rec["error"] is None and rec["response"]["status_code"] == 400, rec
            assert rec["response"]["body"]["error"]["param"] == what, rec
        assert rec["custom_id"] == cid
    return refused


# ----- admission: grouped by shared prefix, unless prefix-aware order is off --------------------
def test_lines_are_admitted_grouped_by_shared_prefix(llm: LLM, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prefixes = ["You are a pirate. Answer: ", "You are a judge. Answer: "]
    prompts = [prefixes[i % 2] + f"what is {TOPICS[i]}?" for i in range(6)]
    write_input(tmp_path / "in.jsonl", [
        request(f"r{i}", CMPL, {"model": NAME, "prompt": p, "max_tokens": 2, "temperature": 0})
        for i, p in enumerate(prompts)])
    admitted: list[str | None] = []
    add_request = llm.engine.add_request

    def spy(request_id: str, ids: list[int], params: Any, prompt: str | None = None,
            lora: Any = None, output_kind: Any = None) -> None:
        admitted.append(prompt)
        add_request(request_id, ids, params, prompt=prompt, lora=lora, output_kind=output_kind)

    monkeypatch.setattr(llm.engine, "add_request", spy)
    BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "grouped.jsonl")).run(
        llm, NAME, progress=False)
    assert admitted == sorted(prompts, key=llm.tokenizer.encode)
    groups = [p.split(".")[0] for p in admitted]   # each prefix's lines together
    assert groups[:3] == [groups[0]] * 3 and groups[3:] == [groups[3]] * 3 != groups[:3]

    admitted.clear()
    monkeypatch.setattr(llm, "prefix_aware_order", False)
    BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "in_order.jsonl")).run(
        llm, NAME, progress=False)
    assert admitted == prompts
    assert successes(read_output(tmp_path / "grouped.jsonl")).keys() == \
        successes(read_output(tmp_path / "in_order.jsonl")).keys() == {f"r{i}" for i in range(6)}


# ----- resume in-process: a stop part-way, a torn last line, the rerun -------------------------
def test_stop_then_resume_after_a_torn_line_equals_an_uninterrupted_run(
        llm: LLM, tmp_path: Path) -> None:
    lines = story_lines(10, max_tokens=6)
    lines[3:3] = ["[1, 2]", request("req-0", CMPL, {"model": NAME, "prompt": "x"})]
    write_input(tmp_path / "in.jsonl", lines)
    reference = BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "ref.jsonl"))
    reference.run(llm, NAME, progress=False)
    expected = read_output(tmp_path / "ref.jsonl")

    out = tmp_path / "out.jsonl"
    job = BatchJob(str(tmp_path / "in.jsonl"), str(out))
    watcher = threading.Thread(target=_stop_after, args=(job, out, 5))
    watcher.start()
    first = job.run(llm, NAME, max_in_flight=1, progress=False)
    watcher.join()
    assert first.interrupted and 5 <= first.done < len(lines)
    assert_pool_full(llm)                              # the requests in flight were aborted

    kept = read_output(out)[:-1]                       # the last line torn in half by a "kill"
    torn = json.dumps(read_output(out)[-1])
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + torn[:len(torn) // 2])
    second = BatchJob(str(tmp_path / "in.jsonl"), str(out)).run(llm, NAME, progress=False)
    assert not second.interrupted
    assert second.skipped == len(kept) and second.done == len(lines) - len(kept)
    _assert_same_answers(read_output(out), expected)


def _stop_after(job: BatchJob, out: Path, num_lines: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= num_lines:
            job.request_stop()
            return
        time.sleep(0.002)
    job.request_stop()


def _assert_same_answers(records: list[dict], expected: list[dict]) -> None:
    """Same successes (bodies but their ids) and the same error lines, each exactly once."""
    got, want = successes(records), successes(expected)
    assert {k: without_ids(v) for k, v in got.items()} == \
           {k: without_ids(v) for k, v in want.items()}

    def errors(recs: list[dict]) -> list[tuple]:
        return sorted((r["custom_id"] or "", json.dumps(r["error"]),
                       json.dumps(r["response"] and r["response"]["body"])) for r in recs
                      if r["error"] or r["response"]["status_code"] != 200)
    assert errors(records) == errors(expected)
    assert len(records) == len(expected)


def test_files_that_make_the_job_impossible(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", story_lines(2))
    with pytest.raises(BatchFileError, match="does not exist"):
        BatchJob(str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"))
    with pytest.raises(BatchFileError, match="cannot write OUTPUT"):
        BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "no" / "dir" / "out.jsonl"))
    with pytest.raises(BatchFileError, match="INPUT itself"):
        BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "in.jsonl"))
    (tmp_path / "other.jsonl").write_text('{"custom_id": "a"}\nhello\n{"custom_id": "b"}\n')
    with pytest.raises(BatchFileError, match="line 2 is not a batch output line"):
        BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "other.jsonl"))


# ----- the real command: SIGKILL, then Ctrl-C, then a rerun to the end --------------------------
TASKLOOM = [sys.executable, "-m", "taskloom.cli", "batch"]
SMALL_ENGINE = ["--max-num-seqs", "8", "--kv-cache-memory-gb", "0.1", "--dtype", "float32",
                "--served-model-name", NAME]      # the oracle's dtype (the CLI's is auto)


def _start(tmp_path: Path, run: str, model: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / f"{run}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(TASKLOOM + [str(tmp_path / "in.jsonl"),
                                            str(tmp_path / "out.jsonl"), "--model", model]
                                + SMALL_ENGINE, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, log


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for_lines(proc: subprocess.Popen, log: Path, out: Path, at_least: int) -> int:
    deadline = time.monotonic() + 240
    while (n := _complete_lines(out)) < at_least:
        assert proc.poll() is None, f"the job ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no progress:\n{log.read_text()}"
        time.sleep(0.01)
    return n


def test_sigkill_and_ctrl_c_then_rerun_answers_every_line_once(
        tiny_llm: LLM, tiny_model: str, tmp_path: Path) -> None:
    """On the tiny chat model: what is tested is the job's, not the model's."""
    lines = story_lines(40, max_tokens=48)
    lines[4:4] = ["this is not json"]
    lines[20:20] = [request("req-2", CMPL, {"model": NAME, "prompt": "again"})]  # duplicate
    write_input(tmp_path / "in.jsonl", lines)
    BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "ref.jsonl")).run(tiny_llm, NAME,
                                                                          progress=False)
    expected = read_output(tmp_path / "ref.jsonl")
    out = tmp_path / "out.jsonl"

    proc, log = _start(tmp_path, "killed", tiny_model)
    _wait_for_lines(proc, log, out, 6)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    after_kill = _complete_lines(out)
    assert after_kill < len(lines), "the job finished before the kill"

    proc, log = _start(tmp_path, "interrupted", tiny_model)
    _wait_for_lines(proc, log, out, after_kill + 4)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, log.read_text()
    text = log.read_text()
    assert "Run the same command again to resume" in text and "Traceback" not in text, text
    after_int = len(read_output(out))                  # a clean stop leaves no torn line
    assert after_kill + 4 <= after_int < len(lines)

    proc, log = _start(tmp_path, "finished", tiny_model)
    assert proc.wait(240) == 0, log.read_text()
    assert f"{after_int} skipped as already in" in log.read_text()
    _assert_same_answers(read_output(out), expected)


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(
        llm: LLM, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", story_lines(3))
    out = tmp_path / "out.jsonl"
    job = BatchJob(str(tmp_path / "in.jsonl"), str(out))
    # A real second process: the CLI refuses before it loads a model.
    second = subprocess.run(TASKLOOM + [str(tmp_path / "in.jsonl"), str(out)] + SMALL_ENGINE,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert "being written by another taskloom batch run" in second.stderr, second.stderr
    assert job.run(llm, NAME, progress=False).done == 3
    with pytest.raises(RuntimeError, match="has run"):
        job.run(llm, NAME, progress=False)
    # Once the first has let go, a rerun finds every line answered.
    rerun = BatchJob(str(tmp_path / "in.jsonl"), str(out))
    assert rerun.run(llm, NAME, progress=False).skipped == 3
    assert len(read_output(out)) == 3


def test_tool_choice_auto_with_a_parser(llm: LLM, tmp_path: Path) -> None:
    """As the server with --tool-call-parser: the calls the model writes come back as
    tool_calls; without a parser, the same line is a 400 naming tool_choice."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    body = {"model": NAME, "max_tokens": 48, "temperature": 0, "tools": tools,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "guided_regex": r'<tool_call>\{"name": "get_weather", "arguments": '
                            r'\{"city": "Paris"\}\}</tool_call>'}
    write_input(tmp_path / "in.jsonl", [request("auto", CHAT, body)])
    for parser, out in ((TOOL_CALL_PARSERS["hermes"], "with.jsonl"), (None, "without.jsonl")):
        BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / out)).run(
            llm, NAME, progress=False, tool_call_parser=parser)
    (with_parser,) = read_output(tmp_path / "with.jsonl")
    choice = with_parser["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    (without,) = read_output(tmp_path / "without.jsonl")
    assert without["response"]["status_code"] == 400
    assert without["response"]["body"]["error"]["param"] == "tool_choice"
