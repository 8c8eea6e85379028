"""The torch reference under a sliding window with attention sinks: decodes, prefill chunks
over a cached prefix and whole prompts, against dense masked attention, never reading the
blocks outside every query's window."""
from __future__ import annotations

import pytest
import torch

from taskloom.config import AttentionWindow
from taskloom.ops.attention import paged_attention_ref
from tests.ops.window_cases import dense_windowed, windowed_batch

# (tokens cached, new tokens): decodes inside and past the window, chunks that straddle it,
# a prompt longer than the window in one chunk.
DECODES = [(0, 1), (20, 1), (47, 1), (48, 1), (130, 1), (299, 1)]
CHUNKS = [(0, 70), (40, 9), (100, 33), (5, 1), (200, 1), (64, 64)]


@pytest.mark.parametrize("sinks", [0, 4, 20])
@pytest.mark.parametrize("seqs", [DECODES, CHUNKS], ids=["decodes", "chunks"])
def test_windowed_reference_matches_dense_and_reads_no_evicted_block(
        seqs: list[tuple[int, int]], sinks: int) -> None:
    window = AttentionWindow(48, sinks)
    query, poisoned, clean, meta, clean_meta = windowed_batch(seqs, window, 6, 2, 32, seed=sinks)
    assert poisoned.isnan().any()
    out = paged_attention_ref(query, poisoned, meta, 0.2)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), dense_windowed(query, clean, clean_meta, 0.2),
                               atol=1e-5, rtol=1e-5)


def test_window_wider_than_every_context_is_plain_causal_attention() -> None:
    query, _, clean, meta, _ = windowed_batch(CHUNKS, AttentionWindow(1000, 0), 4, 4, 16, seed=1)
    windowed = paged_attention_ref(query, clean, meta, 0.25)
    meta.window, meta.ref_plan = None, None
    torch.testing.assert_close(windowed, paged_attention_ref(query, clean, meta, 0.25))
