"""The CPU path's C kernels (taskloom.ops.cpu_kernels) against their torch references, in
bfloat16: bit for bit where the reference's roundings are elementwise (the residual add,
rotary, the KV-cache write), within a bf16 rounding where it sums (RMSNorm's mean, SiLU's
exp) or within float32 noise of the float32 reference (decode attention). Inputs they do not
take (other dtypes, strided rows) go to the reference; a bf16 model on the CPU runs them."""
from __future__ import annotations

import pytest
import torch

from taskloom.config import AttentionWindow
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.loader import build_model, init_random_weights
from taskloom.models.weights import materialize
from taskloom.ops import activation, attention, cpu_kernels, rmsnorm, rotary
from taskloom.ops.backend import TORCH_OPS, select_ops
from tests.models.single_seq import forward_batch
from tests.ops.paged_cases import paged_batch
from tests.ops.test_backend import ARCH, PROMPTS
from tests.ops.window_cases import dense_windowed, windowed_batch

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason="the C kernels do not build here (no C compiler)")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at each of x's magnitudes (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(1e-30))) - 7)


def assert_within_a_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal but for a bf16 rounding here and there: a float32 sum in another order."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (actual.float() - expected.float()).abs()
    assert (diff <= bf16_ulp(expected)).all(), diff.max()
    assert actual.numel() == 0 or (actual == expected).float().mean() > 0.97


@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 100), (300, 64), (0, 576), (3, 4096)])
def test_rms_norms_match_the_reference(rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    x, res = (torch.randn(rows, hidden, generator=gen).to(BF16) * 3 for _ in range(2))
    w = (torch.randn(hidden, generator=gen) + 1).to(BF16)
    assert_within_a_rounding(cpu_kernels.rms_norm(x, w, 1e-5), rmsnorm.rms_norm(x, w, 1e-5))
    out, new_res = cpu_kernels.fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = rmsnorm.fused_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)          # the add rounds once, as torch's does
    assert_within_a_rounding(out, ref_out)


def test_rms_norm_of_strided_or_float32_rows_is_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(4, 3 * 64, generator=gen).to(BF16)
    q = qkv[:, :128].reshape(4, 2, 64)              # Qwen3's per-head norm of a strided view
    w = torch.randn(64, generator=gen).to(BF16)
    assert torch.equal(cpu_kernels.rms_norm(q, w, 1e-6), rmsnorm.rms_norm(q, w, 1e-6))
    x32 = torch.randn(3, 64, generator=gen)
    assert torch.equal(cpu_kernels.rms_norm(x32, w.float(), 1e-6),
                       rmsnorm.rms_norm(x32, w.float(), 1e-6))
    with pytest.raises(ValueError, match="same shape"):
        cpu_kernels.fused_add_rms_norm(x32, x32[:2], w.float(), 1e-6)
    with pytest.raises(ValueError, match="RMSNorm weight of 64 for rows of 32"):
        cpu_kernels.rms_norm(torch.ones(2, 32, dtype=BF16), w, 1e-6)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (7, 100), (64, 3072), (0, 8)])
def test_silu_and_mul_matches_the_reference(rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(rows, 2 * inter, generator=gen) * 4).to(BF16)
    if rows:    # the tails of the exp: silu's saturation and underflow
        x[0, :6] = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 200.0])
    assert_within_a_rounding(cpu_kernels.silu_and_mul(x), activation.silu_and_mul(x))
    three_d = x.reshape(1, rows, 2 * inter)
    assert cpu_kernels.silu_and_mul(three_d).shape == (1, rows, inter)


def rotary_inputs(n: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  seed: int) -> tuple[torch.Tensor, ...]:
    """Positions and q/k/v as the model has them: strided views of one fused projection."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(BF16)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (n,), generator=gen)
    positions[0] = 4095
    return (positions, q.reshape(n, num_heads, head_dim), k.reshape(n, num_kv_heads, head_dim),
            v.reshape(n, num_kv_heads, head_dim))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (2, 1, 6)])
def test_rotary_and_the_cache_write_are_the_references_bit_for_bit(
        num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    table = rotary.RotaryEmbedding(head_dim, 4096, 500000.0).cos_sin_cache
    positions, q, k, v = rotary_inputs(37, num_heads, num_kv_heads, head_dim, head_dim)
    for ours, ref in zip(cpu_kernels.apply_rotary(positions, q, k, table),
                         rotary.apply_rotary(positions, q, k, table)):
        assert torch.equal(ours, ref)
    cache = torch.randn(2, 5, 16, num_kv_heads, head_dim).to(BF16)
    ref_cache = cache.clone()
    slots = torch.randperm(80)[:37]
    q_rot = cpu_kernels.apply_rotary_to_cache(positions, q, k, v, table, cache, slots)
    ref_q = rotary.apply_rotary_to_cache(positions, q, k, v, table, ref_cache, slots)
    assert torch.equal(q_rot, ref_q) and torch.equal(cache, ref_cache)


def test_rotary_refuses_a_position_past_its_table_and_skips_negative_slots() -> None:
    table = rotary.RotaryEmbedding(64, 128, 10000.0).cos_sin_cache
    positions, q, k, v = rotary_inputs(3, 4, 2, 64, 0)
    with pytest.raises(IndexError, match="outside the rotary table of 128 positions"):
        cpu_kernels.apply_rotary(positions, q, k, table)
    cache = torch.zeros(2, 1, 16, 2, 64, dtype=BF16)
    positions = torch.tensor([0, 5, 127])
    cpu_kernels.apply_rotary_to_cache(positions, q, k, v, table, cache, torch.tensor([3, -1, 0]))
    _, ref_k = rotary.apply_rotary(positions, q, k, table)
    stored = cache.view(2, 16, 2, 64)
    assert torch.equal(stored[0, 3], ref_k[0]) and torch.equal(stored[1, 0], v[2])
    assert not stored[:, [1, 2, 4]].any()           # the negative slot wrote nothing


def c_decodes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the reference's decode batch runs: the C kernel must take the decodes."""
    def reference_ran(*args: object) -> None:
        raise AssertionError("the decodes went to the reference")
    monkeypatch.setattr(attention, "decode_batch", reference_ran)


def assert_attention_close(ours: torch.Tensor, query: torch.Tensor, cache: torch.Tensor,
                           meta, scale: float) -> None:
    """Against the float32 reference on the same bf16 inputs: an output rounding off, as
    the bf16 reference is."""
    meta.ref_plan = None
    expected = attention.paged_attention_ref(query.float(), cache.float(), meta, scale)
    meta.ref_plan = None
    bf16_ref = attention.paged_attention_ref(query, cache, meta, scale)
    assert ours.dtype == BF16 and ours.shape == query.shape
    err = (ours.float() - expected).abs().max()
    assert err <= 1.5 * (bf16_ref.float() - expected).abs().max() + 1e-3, err


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim",
                         [(9, 3, 64), (8, 2, 128), (4, 4, 80), (6, 2, 72), (32, 1, 64)])
def test_decode_attention_matches_the_reference(num_heads: int, num_kv_heads: int,
                                                head_dim: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """GQA groups of 1-32 (above 16: the reference's), head dims on and off the vector path,
    contexts of 1 to 300 keys across block boundaries."""
    seqs = [(0, 1), (14, 1), (15, 1), (16, 1), (129, 1), (299, 1)]
    query, cache, meta = paged_batch(seqs, num_heads, num_kv_heads, head_dim, BF16, "cpu", 3)
    scale = head_dim ** -0.5
    with monkeypatch.context() as m:
        if num_heads // num_kv_heads <= cpu_kernels.MAX_GROUP:
            c_decodes_only(m)
        out = cpu_kernels.paged_attention(query, cache, meta, scale)
    assert meta.ref_plan.decode_lens.tolist() == [c + 1 for c, _ in seqs]
    assert_attention_close(out, query, cache, meta, scale)


def test_decodes_beside_prefill_chunks_and_a_shared_prefix() -> None:
    """One step: prefill chunks (the reference's), two decodes sharing their first blocks
    (the reference's shared-prefix group) and decodes alone (C)."""
    seqs = [(40, 1), (40, 1), (0, 30), (100, 1), (50, 7), (3, 1)]
    query, cache, meta = paged_batch(seqs, 6, 2, 64, BF16, "cpu", 5)
    meta.block_tables[1, :2] = meta.block_tables[0, :2]
    out = cpu_kernels.paged_attention(query, cache, meta, 0.125)
    plan = meta.ref_plan
    assert [g.rows.tolist() for g in plan.shared] == [[0, 1]]
    assert plan.decode_rows.tolist() == [32, 40]     # the two lone decodes' rows
    assert_attention_close(out, query, cache, meta, 0.125)


@pytest.mark.parametrize("sinks", [0, 4])
def test_decode_attention_in_a_window_reads_no_released_block(
        sinks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    window = AttentionWindow(48, sinks)
    seqs = [(0, 1), (20, 1), (47, 1), (48, 1), (130, 1), (299, 1)]
    query, poisoned, clean, meta, clean_meta = windowed_batch(seqs, window, 6, 2, 32, sinks)
    c_decodes_only(monkeypatch)
    out = cpu_kernels.paged_attention(query.to(BF16), poisoned.to(BF16), meta, 0.2)
    assert not out.isnan().any()
    expected = dense_windowed(query.to(BF16).float(), clean.to(BF16).float(), clean_meta, 0.2)
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_float32_attention_is_the_reference() -> None:
    query, cache, meta = paged_batch([(10, 1), (33, 1)], 4, 2, 64, torch.float32, "cpu", 1)
    out = cpu_kernels.paged_attention(query, cache, meta, 0.125)
    meta.ref_plan = None
    assert torch.equal(out, attention.paged_attention_ref(query, cache, meta, 0.125))


def test_a_bf16_model_on_the_cpu_runs_the_c_kernels_and_matches_the_references(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert select_ops(cpu, torch.float32) is TORCH_OPS     # the oracle path is unchanged
    model = build_model(ARCH, BF16, cpu)
    assert model.ops.name == "cpu" and model.model.layers[0].mlp.ops is model.ops
    init_random_weights(model, seed=0)
    with torch.device("meta"):
        reference = LlamaForCausalLM(ARCH)
    materialize(reference, BF16, cpu)
    init_random_weights(reference.eval(), seed=0)
    for ours, expected in zip(forward_batch(model, PROMPTS), forward_batch(reference, PROMPTS)):
        torch.testing.assert_close(ours.float(), expected.float(), atol=0.1, rtol=0.05)
    monkeypatch.setenv("TASKLOOM_CPU_KERNELS", "0")
    assert select_ops(cpu, BF16) is TORCH_OPS
