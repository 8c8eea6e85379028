"""Gated activation for Llama-family MLPs: the torch reference.

The MLP's gate and up projections are one fused linear whose output is `[gate | up]`; this op
computes `silu(gate) * up` from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :I]) * x[..., I:]` for x: [..., 2*I]; returns [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension [.., 2*I], got {x.shape[-1]}")
    gate, up = x.chunk(2, dim=-1)                            # [..., I] each
    return F.silu(gate) * up
