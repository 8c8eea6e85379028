"""Encoding streamed chunks: an Envelope encodes each chunk once per stream's fixed fields,
giving exactly what json.dumps gives for the whole chunk, on one line."""
from __future__ import annotations

import json

from taskloom.server.streaming import Envelope


def test_an_envelope_encodes_what_json_dumps_gives_for_the_whole_chunk() -> None:
    fields = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "smöl"}
    choices = [{"index": 0, "text": "héllo\n\"x\"", "logprobs": None, "finish_reason": None}]
    for usage in (False, True):
        env = Envelope(fields, usage)
        assert env.encode(choices) == json.dumps(env.chunk(choices), ensure_ascii=False)
        assert "\n" not in env.encode(choices)      # one line: one `data:` field
    assert list(Envelope(fields, True).chunk([])) == [*fields, "choices", "usage"]
