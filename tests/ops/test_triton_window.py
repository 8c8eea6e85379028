"""The Triton attention kernels under a sliding window with attention sinks, against dense
masked attention (through the interpreter on the CPU, compiled on a GPU): the blocks outside
every query's window hold NaN, so a kernel that read one would fail."""
from __future__ import annotations

import pytest
import torch

from taskloom.config import AttentionWindow
from tests.ops.triton_marks import GPU, INTERPRETER
from tests.ops.window_cases import dense_windowed, windowed_batch
from taskloom.ops.triton import attention  # noqa: E402
from taskloom.ops.triton.decode_attention import paged_decode_attention  # noqa: E402

CASES = {
    "cpu": {"decode": [(0, 1), (47, 1), (48, 1), (130, 1), (299, 1)],
            "mixed": [(0, 70), (40, 9), (100, 33), (200, 1), (64, 64)]},
    "cuda": {"decode": [(0, 1), (1000, 1), (4095, 1), (5000, 1), (300, 1)],
             "mixed": [(0, 1500), (3000, 200), (900, 1), (4500, 64), (17, 30)]},
}
WINDOWS = {"cpu": 48, "cuda": 1024}
SHAPES = [pytest.param("cpu", 6, 2, 64, id="interpreter-h6-kv2-d64", marks=INTERPRETER),
          pytest.param("cuda", 32, 8, 128, id="cuda-h32-kv8-d128", marks=GPU)]


@pytest.mark.parametrize("sinks", [0, 4, 20])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", SHAPES)
def test_windowed_kernels_match_dense_attention(device: str, num_heads: int,
                                                num_kv_heads: int, head_dim: int, kind: str,
                                                sinks: int) -> None:
    window = AttentionWindow(WINDOWS[device], sinks)
    query, poisoned, clean, meta, clean_meta = windowed_batch(CASES[device][kind], window, num_heads,
                                                  num_kv_heads, head_dim, seed=sinks)
    expected = dense_windowed(query, clean, clean_meta, 0.125).float()
    dev = torch.device(device)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(dev))
    out = attention.paged_attention(query.to(dev), poisoned.to(dev), meta, 0.125)
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device,num_heads,num_kv_heads,head_dim", SHAPES)
def test_windowed_decode_with_fixed_splits_as_in_cuda_graphs(device: str, num_heads: int,
                                                             num_kv_heads: int,
                                                             head_dim: int) -> None:
    """A graph fixes the split count at capture; the splits then cover each window."""
    window = AttentionWindow(WINDOWS[device], 4)
    query, poisoned, clean, meta, clean_meta = windowed_batch(CASES[device]["decode"], window, num_heads,
                                                  num_kv_heads, head_dim, seed=7)
    expected = dense_windowed(query, clean, clean_meta, 0.125).float()
    dev = torch.device(device)
    for splits in (1, 3, 8):
        out = paged_decode_attention(query.to(dev), poisoned.to(dev), meta.block_tables.to(dev),
                                     meta.seq_lens.to(dev), 0.125, meta.max_seq_len, splits,
                                     window=window)
        torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)
