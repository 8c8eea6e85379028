"""Triton batched-LoRA kernels (taskloom.ops.triton.lora) against the torch reference.

As in tests/ops/test_triton_kernels.py: without CUDA the kernels run on the CPU through the
Triton interpreter with small shapes; with CUDA they run compiled with the shapes of a 7-8B
model's fused qkv projection (marked `gpu`), and the interpreter cases skip. Batches mix
segments of several lengths (one crossing a row block), tokens without an adapter (slot -1)
and slots that come back non-contiguously; decode metadata makes every token a segment.
"""
from __future__ import annotations

import pytest
import torch

from taskloom.lora.metadata import LoRAMetadata, build_lora_metadata
from taskloom.ops import lora as lora_ref
from taskloom.ops.backend import TORCH_OPS, triton_ops

from tests.ops.triton_marks import DEVICES, DTYPES, GPU, INTERPRETER
from taskloom.ops.triton import lora as tr_lora  # noqa: E402
# (device, in_features, rank K, out_features, num_slots). K is never a power of two (48: fused
# qkv at rank 16; 96 spans two tiles of 64); in/out are ragged against the 64-wide blocks.
SHAPES = [
    pytest.param("cpu", 72, 12, 100, 3, id="interpreter-in72-k12-out100", marks=INTERPRETER),
    pytest.param("cpu", 40, 96, 24, 4, id="interpreter-in40-k96-out24", marks=INTERPRETER),
    pytest.param("cuda", 4096, 48, 6144, 8, id="cuda-in4096-k48-out6144", marks=GPU),
    pytest.param("cuda", 2000, 96, 1000, 5, id="cuda-in2000-k96-out1000", marks=GPU),
]
# (slot, length) of each segment of a mixed batch: 1, 5, 17 and 33 tokens plus one longer than
# a row block (64); slot 2 comes back after other segments; two segments have no adapter.
MIXED = {"cpu": [(2, 5), (-1, 17), (0, 1), (2, 70), (1, 33)],
         "cuda": [(2, 5), (-1, 17), (0, 1), (2, 200), (1, 33), (-1, 44)]}
DECODE_TOKENS = {"cpu": 12, "cuda": 300}
BATCHES = ["mixed", "decode"]
# The shrink's products are exact in float32 for every input dtype, so only the summation
# order differs; the expand rounds y once, to y's dtype (and uses TF32 for half-precision B).
SHRINK_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
EXPAND_TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5},
              torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
              torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


def skip_interpreted_bf16(device: str, dtype: torch.dtype) -> None:
    """The interpreter's tl.dot multiplies bfloat16 bit patterns as integers, and its float32
    -> bfloat16 casts truncate instead of rounding."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's tl.dot multiplies bfloat16 bit patterns as "
                    "integers; bfloat16 LoRA is checked on the GPU")


def decode_metadata(token_slots: list[int], device: str) -> LoRAMetadata:
    """Every token its own segment, as a CUDA graph of decodes fixes it (equal neighbours
    included): seg_starts = arange(n + 1), max_seg_len = 1."""
    n = len(token_slots)
    slots = torch.tensor(token_slots, dtype=torch.int32, device=device)
    return LoRAMetadata(
        token_slots=slots, seg_starts=torch.arange(n + 1, dtype=torch.int32, device=device),
        seg_slots=slots.clone(), seg_starts_cpu=list(range(n + 1)), seg_slots_cpu=token_slots,
        max_seg_len=1)


def batch_metadata(batch: str, device: str, num_slots: int) -> LoRAMetadata:
    """A mixed prefill/decode batch built the engine's way, or decode metadata whose slots run
    -1, -1, 0, 0, 1, 1, ... (adjacent equal slots stay separate segments)."""
    if batch == "decode":
        return decode_metadata([(i // 2) % (num_slots + 1) - 1
                                for i in range(DECODE_TOKENS[device])], device)
    token_slots = [slot for slot, length in MIXED[device] for _ in range(length)]
    meta = build_lora_metadata(token_slots, torch.device(device))
    assert meta.seg_slots_cpu == [slot for slot, _ in MIXED[device]]
    return meta


def adapter_weights(num_slots: int, rank: int, in_features: int, out_features: int,
                    dtype: torch.dtype, device: str,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random A [num_slots, K, in] and B [num_slots, out, K], scaled so that the shrink's and
    the expand's outputs are of order 1."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(num_slots, rank, in_features, generator=gen) * in_features ** -0.5
    lora_b = torch.randn(num_slots, out_features, rank, generator=gen) * rank ** -0.5
    return lora_a.to(device, dtype), lora_b.to(device, dtype)


def adapter_rows(meta: LoRAMetadata) -> torch.Tensor:
    """[num_tokens] bool: the tokens with an adapter."""
    return meta.token_slots >= 0


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,in_features,rank,out_features,num_slots", SHAPES)
def test_shrink_matches_reference(device: str, in_features: int, rank: int, out_features: int,
                                  num_slots: int, dtype: torch.dtype, batch: str) -> None:
    skip_interpreted_bf16(device, dtype)
    meta = batch_metadata(batch, device, num_slots)
    lora_a, _ = adapter_weights(num_slots, rank, in_features, out_features, dtype, device, 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(meta.num_tokens, in_features, generator=gen).to(device, dtype)
    t = tr_lora.lora_shrink(x, lora_a, meta)
    assert t.dtype == torch.float32 and t.shape == (meta.num_tokens, rank)
    tol = SHRINK_TOL[dtype]
    torch.testing.assert_close(t, lora_ref.lora_shrink(x, lora_a, meta), atol=tol, rtol=tol)
    assert torch.equal(t[~adapter_rows(meta)], torch.zeros_like(t[~adapter_rows(meta)]))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,in_features,rank,out_features,num_slots", SHAPES)
def test_expand_adds_in_place_and_leaves_other_rows(device: str, in_features: int, rank: int,
                                                    out_features: int, num_slots: int,
                                                    dtype: torch.dtype, batch: str) -> None:
    """y is a column slice of a wider output, as the q, k and v parts of a fused projection
    are: the kernel adds into it in place and touches neither other columns nor the rows
    without an adapter (t is nonzero there, so using it would show)."""
    skip_interpreted_bf16(device, dtype)
    meta = batch_metadata(batch, device, num_slots)
    _, lora_b = adapter_weights(num_slots, rank, in_features, out_features, dtype, device, 2)
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(meta.num_tokens, rank, generator=gen).to(device)        # [n, K] float32
    fused = torch.randn(meta.num_tokens, out_features + 9, generator=gen).to(device, dtype)
    before = fused.clone()
    y = fused[:, 4:4 + out_features]                                      # [n, out], a view
    tr_lora.lora_expand(t, lora_b, meta, y)
    expected = before[:, 4:4 + out_features].clone()
    lora_ref.lora_expand(t, lora_b, meta, expected)
    torch.testing.assert_close(y, expected, **EXPAND_TOL[dtype])
    rows = adapter_rows(meta)
    assert torch.equal(fused[~rows], before[~rows])
    assert torch.equal(fused[:, :4], before[:, :4])
    assert torch.equal(fused[:, 4 + out_features:], before[:, 4 + out_features:])
    assert not torch.equal(fused[rows], before[rows])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_ops_run_the_lora_kernels_like_the_reference(device: str) -> None:
    """`triton_ops()` carries the kernels, `TORCH_OPS` the references; shrink then expand
    through each gives the same LoRA term on a mixed batch."""
    ops = triton_ops()
    assert (ops.lora_shrink, ops.lora_expand) == (tr_lora.lora_shrink, tr_lora.lora_expand)
    assert (TORCH_OPS.lora_shrink, TORCH_OPS.lora_expand) == (lora_ref.lora_shrink,
                                                              lora_ref.lora_expand)
    meta = batch_metadata("mixed", device, 3)
    lora_a, lora_b = adapter_weights(3, 16, 48, 80, torch.float32, device, 4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(meta.num_tokens, 48, generator=gen).to(device)
    y0 = torch.randn(meta.num_tokens, 80, generator=gen).to(device)
    results = []
    for impl in (ops, TORCH_OPS):
        y = y0.clone()
        impl.lora_expand(impl.lora_shrink(x, lora_a, meta), lora_b, meta, y)
        results.append(y)
    torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("token_slots", [pytest.param([-1] * 20, id="no-adapters"),
                                         pytest.param([], id="empty")])
def test_batches_without_adapters_change_nothing(device: str, token_slots: list[int]) -> None:
    meta = build_lora_metadata(token_slots, torch.device(device))
    lora_a, lora_b = adapter_weights(2, 12, 40, 30, torch.float32, device, 6)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(len(token_slots), 40, generator=gen).to(device)
    t = tr_lora.lora_shrink(x, lora_a, meta)
    assert torch.equal(t, torch.zeros(len(token_slots), 12, device=device))
    y = torch.randn(len(token_slots), 30, generator=gen).to(device)
    before = y.clone()
    tr_lora.lora_expand(torch.ones_like(t), lora_b, meta, y)
    assert torch.equal(y, before)


def test_mismatched_shapes_are_rejected() -> None:
    meta = build_lora_metadata([0, 0, 1], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lora_a must be \[num_slots, K, 8\]"):
        tr_lora.lora_shrink(torch.zeros(3, 8), torch.zeros(2, 4, 6), meta)
    with pytest.raises(ValueError, match=r"x must be \[num_tokens, features\]"):
        tr_lora.lora_shrink(torch.zeros(2, 8), torch.zeros(2, 4, 8), meta)
    with pytest.raises(ValueError, match=r"t must be \[num_tokens, 3\]"):
        tr_lora.lora_expand(torch.zeros(3, 4), torch.zeros(2, 5, 3), meta, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"lora_b must be \[num_slots, out, R\] with y"):
        tr_lora.lora_expand(torch.zeros(3, 4), torch.zeros(2, 6, 4), meta, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="t must be float32"):
        tr_lora.lora_expand(torch.zeros(3, 4, dtype=torch.float16), torch.zeros(2, 5, 4), meta,
                            torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_expand_of_a_fused_projection_equals_its_block_diagonal_form(device: str,
                                                                     dtype: torch.dtype) -> None:
    """A fused q/k/v projection's compact B ([out, R], sub-projection j reading t's columns
    j*R:(j+1)*R) gives, in the kernel and the reference, what the block-diagonal B
    ([out, 3R], zeros off the diagonal blocks) gives as one plain expand."""
    skip_interpreted_bf16(device, dtype)
    r, q, kv = 8, 40, 24
    slices = ((0, q), (q, kv), (q + kv, kv))
    meta = batch_metadata("mixed", device, 3)
    gen = torch.Generator().manual_seed(9)
    compact = torch.randn(3, q + 2 * kv, r, generator=gen).to(device, dtype)   # [S, out, R]
    diagonal = torch.zeros(3, q + 2 * kv, 3 * r, dtype=dtype, device=device)   # [S, out, 3R]
    for j, (o, size) in enumerate(slices):
        diagonal[:, o:o + size, j * r:(j + 1) * r] = compact[:, o:o + size]
    t = torch.randn(meta.num_tokens, 3 * r, generator=gen).to(device)
    y0 = torch.randn(meta.num_tokens, q + 2 * kv, generator=gen).to(device, dtype)
    want = y0.clone()
    lora_ref.lora_expand(t, diagonal, meta, want)
    for expand in (lora_ref.lora_expand, tr_lora.lora_expand):
        y = y0.clone()
        expand(t, compact, meta, y, slices)
        torch.testing.assert_close(y, want, **EXPAND_TOL[dtype])
