"""Batched LoRA ops, torch reference: every token adds its own adapter's low-rank term.

For a projection `y = x W^T` served with adapters, token i with adapter slot s adds
`(x_i A_s^T) B_s^T`, where the slot's `A_s` is `[K, in]` and `B_s` is `[out, K]` (the adapter's
scaling already folded into B, ranks below K zero-padded). It runs in two ops, as in Punica and
S-LoRA: `lora_shrink` projects every token down to K (float32), `lora_expand` projects back up
and adds into the base output in place. Tokens with slot -1 are left alone.

A fused projection (q/k/v, gate/up) is several projections side by side: its A stacks one
rank-R block per sub-projection (K = num_subs * R), and its B is stored compactly as
`[out, R]`: output rows `out_slices[j]` belong to sub-projection j and read only t's columns
`j*R : (j+1)*R`, so no zero block of a block-diagonal B is ever stored, read or multiplied.

The reference, in float32, takes each long segment of `LoRAMetadata` (a run of at least
`MIN_MATMUL_ROWS` tokens with one slot, as a prefill chunk is) as one matmul, and all tokens of
short segments (decodes: one token each, often each with another adapter) together as one
batched matmul over their gathered adapter weights, so a step costs a few ops per projection
however many adapters it mixes. The Triton kernels (`taskloom.ops.triton.lora`) have the same
signatures and are tested against these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from taskloom.lora.metadata import LoRAMetadata

MIN_MATMUL_ROWS = 8    # shorter segments are gathered into one batched matmul


@dataclass
class _Plan:
    runs: list[tuple[int, int, int]]     # (start, end, slot) of long segments with an adapter
    rows: torch.Tensor | None            # [m] tokens of short segments with an adapter
    slots: torch.Tensor | None           # [m] their slots


def _plan(meta: LoRAMetadata) -> _Plan:
    if meta.ref_plan is None:
        starts, runs, rows, slots = meta.seg_starts_cpu, [], [], []
        for seg, slot in enumerate(meta.seg_slots_cpu):
            a, b = starts[seg], starts[seg + 1]
            if slot < 0:
                continue
            if b - a >= MIN_MATMUL_ROWS:
                runs.append((a, b, slot))
            else:
                rows.extend(range(a, b))
                slots.extend([slot] * (b - a))
        device = meta.token_slots.device
        meta.ref_plan = _Plan(runs, torch.tensor(rows, device=device) if rows else None,
                              torch.tensor(slots, device=device) if slots else None)
    return meta.ref_plan


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMetadata) -> torch.Tensor:
    """x: [n, in]; lora_a: [num_slots, K, in]. Returns float32 [n, K]: `x_i A_{slot_i}^T`,
    zeros for tokens without an adapter."""
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    plan = _plan(meta)
    for a, b, slot in plan.runs:
        out[a:b] = x[a:b].float() @ lora_a[slot].float().t()      # [len, K]
    if plan.rows is not None:
        a_rows = lora_a[plan.slots].float()                       # [m, K, in]
        out[plan.rows] = torch.bmm(a_rows, x[plan.rows].float().unsqueeze(2)).squeeze(2)
    return out


OutSlices = tuple[tuple[int, int], ...]


class ExpandFn(Protocol):
    def __call__(self, t: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata,
                 y: torch.Tensor, out_slices: OutSlices | None = None) -> None: ...


def lora_expand(t: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata,
                y: torch.Tensor, out_slices: OutSlices | None = None) -> None:
    """t: float32 [n, num_subs * R]; lora_b: [num_slots, out, R]; y: [n, out], updated in
    place. Sub-projection j owns the rows `out_slices[j]` = (start, size) of y and B (None: one
    sub-projection, all rows): `y_i[rows] += t_i[j*R:(j+1)*R] B_{slot_i}[rows]^T`, rounded to
    y's dtype once, after the float32 sum."""
    r = lora_b.shape[2]
    slices = out_slices or ((0, y.shape[1]),)
    plan = _plan(meta)
    for a, b, slot in plan.runs:
        for j, (o, size) in enumerate(slices):
            delta = t[a:b, j * r:(j + 1) * r] @ lora_b[slot, o:o + size].float().t()
            y[a:b, o:o + size] = (y[a:b, o:o + size].float() + delta).to(y.dtype)
    if plan.rows is not None:
        rows = plan.rows
        b_rows = lora_b[plan.slots].float()                       # [m, out, R]
        for j, (o, size) in enumerate(slices):
            delta = torch.bmm(b_rows[:, o:o + size],
                              t[rows, j * r:(j + 1) * r].unsqueeze(2)).squeeze(2)  # [m, size]
            y[rows, o:o + size] = (y[rows, o:o + size].float() + delta).to(y.dtype)
