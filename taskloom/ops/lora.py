"""Batched LoRA ops, torch reference: every token adds its own adapter's low-rank term.

For a projection `y = x W^T` served with adapters, token i with adapter slot s adds
`(x_i A_s^T) B_s^T`, where the slot's `A_s` is `[K, in]` and `B_s` is `[out, K]` (the adapter's
scaling already folded into B, ranks below K zero-padded). It runs in two ops, as in Punica and
S-LoRA: `lora_shrink` projects every token down to K (float32), `lora_expand` projects back up
and adds into the base output in place. Tokens with slot -1 are left alone.

The reference walks the segments of `LoRAMetadata` (runs of tokens with one slot): one
pair of matmuls per segment, in float32. The Triton kernels (`taskloom.ops.triton.lora`) have
the same signatures and are tested against these.
"""
from __future__ import annotations

import torch

from taskloom.lora.metadata import LoRAMetadata


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMetadata) -> torch.Tensor:
    """x: [n, in]; lora_a: [num_slots, K, in]. Returns float32 [n, K]: `x_i A_{slot_i}^T`,
    zeros for tokens without an adapter."""
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    starts = meta.seg_starts_cpu
    for seg, slot in enumerate(meta.seg_slots_cpu):
        if slot < 0:
            continue
        a, b = starts[seg], starts[seg + 1]
        out[a:b] = x[a:b].float() @ lora_a[slot].float().t()      # [len, K]
    return out


def lora_expand(t: torch.Tensor, lora_b: torch.Tensor, meta: LoRAMetadata,
                y: torch.Tensor) -> None:
    """t: float32 [n, K]; lora_b: [num_slots, out, K]; y: [n, out], updated in place:
    `y_i += t_i B_{slot_i}^T` (rounded to y's dtype once, after the float32 sum)."""
    starts = meta.seg_starts_cpu
    for seg, slot in enumerate(meta.seg_slots_cpu):
        if slot < 0:
            continue
        a, b = starts[seg], starts[seg + 1]
        delta = t[a:b] @ lora_b[slot].float().t()                # [len, out]
        y[a:b] = (y[a:b].float() + delta).to(y.dtype)
