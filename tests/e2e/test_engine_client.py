"""AsyncEngineClient with the embedded model: a reader that falls behind the engine thread
gets the tokens of every step it missed in one DELTA output (OutputStream), and what it
reads still folds into what the engine generates for the request alone."""
from __future__ import annotations

import asyncio
import time

from taskloom import LLM, SamplingParams
from taskloom.engine.client import AsyncEngineClient
from taskloom.outputs import OutputKind, RequestOutput, add_delta
from tests.e2e.test_engine import PROMPTS


def test_a_reader_behind_the_engine_gets_the_missed_steps_at_once(llm: LLM) -> None:
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True,
                            logprobs=1)
    ids = llm.tokenizer.encode(PROMPTS[3])
    want = llm.generate(ids, params)[0]
    client = AsyncEngineClient(llm.engine)

    async def run() -> list[RequestOutput]:
        client.start(asyncio.get_running_loop())
        try:
            stream = await client.add("late", ids, params, output_kind=OutputKind.DELTA)
            first = await stream.get()
            # Fall behind: let the engine finish the request before reading on.
            deadline = time.monotonic() + 120
            while client.core.has_unfinished and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            rest = [await stream.get()]
            assert len(stream) == 0
            return [first, *rest]
        finally:
            client.stop()

    got = asyncio.run(run())
    assert isinstance(got[0], RequestOutput) and isinstance(got[1], RequestOutput)
    assert [len(c.token_ids) for c in got[0].outputs] == [1, 1]
    assert not got[0].finished and got[1].finished
    # the second output holds the 11 steps after the first
    assert sorted(len(c.token_ids) for c in got[1].outputs) == [11, 11]
    folded = add_delta(add_delta(None, got[0]), got[1])
    for c, w in zip(folded.outputs, want.outputs, strict=True):
        assert (c.index, c.token_ids, c.text, c.finish_reason) == (
            w.index, w.token_ids, w.text, w.finish_reason)
        assert [list(p) for p in c.logprobs] == [list(p) for p in w.logprobs]
