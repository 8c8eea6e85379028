"""OutputStream: a request's outputs that arrive while its previous one is unread join it (DELTA
outputs are folded together, a CUMULATIVE one replaces the unread one), so a reader behind the
engine gets every token, in order, in fewer outputs; exceptions stay in order and never join."""
from __future__ import annotations

import asyncio
import copy
import random

import pytest

from taskloom.engine.client import OutputStream
from taskloom.outputs import (CompletionOutput, Logprob, OutputKind, RequestOutput, add_delta,
                              merge_deltas)


def delta(rid: str, index: int, tokens: list[int], finish: str | None = None,
          logprobs: bool = False, finished: bool = False) -> RequestOutput:
    text = "".join(f"<{t}>" for t in tokens)
    lps = [{t: Logprob(-0.5, 1, f"<{t}>")} for t in tokens] if logprobs else None
    comp = CompletionOutput(index, text, list(tokens), finish, "x" if finish else None, lps,
                            text, list(tokens))
    return RequestOutput(rid, None, [1, 2], [comp], finished=finished)


def folded(outputs: list[RequestOutput]) -> list[tuple]:
    total = None
    for out in outputs:
        total = add_delta(total, copy.deepcopy(out))
    assert total is not None
    return [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
            for c in total.outputs] + [total.finished]


def test_merge_deltas_covers_both_steps() -> None:
    a = delta("r", 0, [5, 6], logprobs=True)
    b = RequestOutput("r", None, [1, 2], [delta("r", 1, [9]).outputs[0],
                                           delta("r", 0, [7], "stop", True).outputs[0]])
    b.outputs[0].logprobs = [{9: Logprob(-1.0, 2, "<9>")}]
    merged = merge_deltas(copy.deepcopy(a), copy.deepcopy(b))
    c0, c1 = merged.outputs                   # index order
    assert (c0.index, c0.text, c0.token_ids) == (0, "<5><6><7>", [5, 6, 7])
    assert (c0.text_delta, c0.token_ids_delta) == ("<5><6><7>", [5, 6, 7])
    assert [list(p) for p in c0.logprobs] == [[5], [6], [7]]
    assert (c0.finish_reason, c0.stop_reason) == ("stop", "x")
    assert (c1.index, c1.text, c1.token_ids, c1.finish_reason) == (1, "<9>", [9], None)
    assert folded([merged]) == folded([a, b])


def test_unread_deltas_join_and_requests_keep_their_order() -> None:
    async def run() -> None:
        s = OutputStream()
        s.track("a", OutputKind.DELTA)
        s.track("b", OutputKind.DELTA)
        s.put_nowait(delta("a", 0, [1]))
        s.put_nowait(delta("b", 0, [10]))
        s.put_nowait(delta("a", 0, [2]))
        s.put_nowait(delta("a", 0, [3], "length", finished=True))
        assert len(s) == 2
        first, second = await s.get(), await s.get()
        assert (first.request_id, first.outputs[0].token_ids, first.finished) == \
            ("a", [1, 2, 3], True)
        assert first.outputs[0].text == "<1><2><3>"
        assert (second.request_id, second.outputs[0].token_ids) == ("b", [10])
        s.put_nowait(delta("b", 0, [11]))    # after a read: a new output
        assert (await s.get()).outputs[0].token_ids == [11]
        assert s.get_nowait() is None

    asyncio.run(run())


def test_cumulative_replaces_the_unread_output() -> None:
    async def run() -> None:
        s = OutputStream()               # untracked requests are taken as CUMULATIVE
        s.put_nowait(delta("c", 0, [1]))
        s.put_nowait(delta("c", 0, [1, 2]))
        out = await s.get()
        assert out.outputs[0].token_ids == [1, 2] and len(s) == 0

    asyncio.run(run())


def test_exceptions_keep_their_place_and_never_join() -> None:
    async def run() -> None:
        s = OutputStream()
        s.track("a", OutputKind.DELTA)
        s.put_nowait(delta("a", 0, [1]))
        s.put_nowait(KeyError("one"))
        s.put_nowait(KeyError("two"))
        s.put_nowait(delta("a", 0, [2]))     # joins the output queued before the errors
        items = [await s.get() for _ in range(3)]
        assert items[0].outputs[0].token_ids == [1, 2]
        assert [type(x) for x in items[1:]] == [KeyError, KeyError]
        assert [x.args for x in items[1:]] == [("one",), ("two",)]

    asyncio.run(run())


def test_get_waits_for_a_put_from_another_task() -> None:
    async def run() -> None:
        s = OutputStream()
        s.track("a", OutputKind.DELTA)
        reader = asyncio.ensure_future(s.get())
        await asyncio.sleep(0)
        assert not reader.done()
        asyncio.get_running_loop().call_soon(s.put_nowait, delta("a", 0, [4]))
        out = await asyncio.wait_for(reader, 5)
        assert out.outputs[0].token_ids == [4]

    asyncio.run(run())


@pytest.mark.parametrize("seed", range(5))
def test_any_reading_pace_folds_to_the_same_completions(seed: int) -> None:
    """Random deltas of several requests with n = 2, read at a random pace: what is read
    folds, request by request, to what was put."""
    rng = random.Random(seed)

    async def run() -> None:
        s = OutputStream()
        put: dict[str, list[RequestOutput]] = {}
        got: dict[str, list[RequestOutput]] = {}
        for rid in "abc":
            s.track(rid, OutputKind.DELTA)
        live = {rid: {0: 0, 1: 0} for rid in "abc"}
        token = 0
        while live:
            rid = rng.choice(sorted(live))
            index = rng.choice(sorted(live[rid]))
            token += 1
            finish = "length" if rng.random() < 0.15 else None
            if finish:
                del live[rid][index]
            out = delta(rid, index, [token] * rng.randint(1, 2), finish,
                        logprobs=rid == "b", finished=not live[rid])
            if not live[rid]:
                del live[rid]
            put.setdefault(rid, []).append(copy.deepcopy(out))
            s.put_nowait(out)
            while len(s) and rng.random() < 0.4:
                item = await s.get()
                got.setdefault(item.request_id, []).append(item)
        while len(s):
            item = await s.get()
            got.setdefault(item.request_id, []).append(item)
        assert sorted(got) == sorted(put)
        for rid in put:
            assert folded(got[rid]) == folded(put[rid])
            assert len(got[rid]) <= len(put[rid])
            assert got[rid][-1].finished and not any(o.finished for o in got[rid][:-1])

    asyncio.run(run())

