"""The op implementations a model calls, chosen once when the model is built.

`TORCH_OPS` holds the torch references (the oracle, and the path of a float32 model on the
CPU); `select_ops` returns the Triton kernels instead when the model lives on a CUDA device
and Triton imports, and the C kernels (`taskloom.ops.cpu_kernels`) for a bfloat16 model on
the CPU where they build (`TASKLOOM_CPU_KERNELS=0` keeps the references there, and the
loader's 8-bit lm head off: `cpu_kernels_enabled`). The Triton
modules are imported only on CUDA, so nothing on a CPU import path imports triton.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from taskloom.lora.metadata import LoRAMetadata
from taskloom.ops import activation, attention, lora, rmsnorm, rotary
from taskloom.runtime.attention import AttentionMetadata

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ops:
    """One implementation of each op, with the signatures of the torch references."""

    name: str
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    fused_add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    rotary: rotary.RotaryFn
    rotary_to_cache: rotary.RotaryToCacheFn     # rotary, then the KV-cache write of k and v
    silu_and_mul: Callable[[Tensor], Tensor]
    write_kv_cache: Callable[[Tensor, Tensor, Tensor, Tensor], None]
    paged_attention: Callable[[Tensor, Tensor, AttentionMetadata, float], Tensor]
    lora_shrink: Callable[[Tensor, Tensor, LoRAMetadata], Tensor]
    lora_expand: lora.ExpandFn


TORCH_OPS = Ops(
    name="torch", rms_norm=rmsnorm.rms_norm, fused_add_rms_norm=rmsnorm.fused_add_rms_norm,
    rotary=rotary.apply_rotary, rotary_to_cache=rotary.apply_rotary_to_cache,
    silu_and_mul=activation.silu_and_mul,
    write_kv_cache=attention.write_kv_cache, paged_attention=attention.paged_attention_ref,
    lora_shrink=lora.lora_shrink, lora_expand=lora.lora_expand)


def triton_ops() -> Ops:
    """The Triton kernels (imports triton; raises ImportError without it)."""
    from taskloom.ops.triton import activation as tr_activation
    from taskloom.ops.triton import attention as tr_attention
    from taskloom.ops.triton import kv_cache as tr_kv_cache
    from taskloom.ops.triton import lora as tr_lora
    from taskloom.ops.triton import rmsnorm as tr_rmsnorm
    from taskloom.ops.triton import rotary as tr_rotary
    return Ops(
        name="triton", rms_norm=tr_rmsnorm.rms_norm,
        fused_add_rms_norm=tr_rmsnorm.fused_add_rms_norm, rotary=tr_rotary.apply_rotary,
        rotary_to_cache=tr_rotary.apply_rotary_to_cache,
        silu_and_mul=tr_activation.silu_and_mul, write_kv_cache=tr_kv_cache.write_kv_cache,
        paged_attention=tr_attention.paged_attention, lora_shrink=tr_lora.lora_shrink,
        lora_expand=tr_lora.lora_expand)


def cpu_ops() -> Ops | None:
    """The C kernels for bfloat16 on the CPU (the references for the rest), or None where
    their library cannot be built here."""
    from taskloom.ops import cpu_kernels
    if cpu_kernels.library() is None:
        return None
    return Ops(
        name="cpu", rms_norm=cpu_kernels.rms_norm,
        fused_add_rms_norm=cpu_kernels.fused_add_rms_norm, rotary=cpu_kernels.apply_rotary,
        rotary_to_cache=cpu_kernels.apply_rotary_to_cache,
        silu_and_mul=cpu_kernels.silu_and_mul, write_kv_cache=attention.write_kv_cache,
        paged_attention=cpu_kernels.paged_attention, lora_shrink=lora.lora_shrink,
        lora_expand=lora.lora_expand)


def cpu_kernels_enabled() -> bool:
    """Whether the C kernels may replace torch on the CPU (`TASKLOOM_CPU_KERNELS` not "0")."""
    return os.environ.get("TASKLOOM_CPU_KERNELS", "1") != "0"


def select_ops(device: torch.device, dtype: torch.dtype = torch.float32) -> Ops:
    """Triton kernels for a CUDA device when Triton imports; the C kernels for bfloat16 on
    the CPU when they build and `TASKLOOM_CPU_KERNELS` is not "0"; else the torch
    references."""
    if device.type != "cuda":
        if dtype != torch.bfloat16 or not cpu_kernels_enabled():
            return TORCH_OPS
        return cpu_ops() or TORCH_OPS
    try:
        ops = triton_ops()
    except ImportError as e:
        logger.warning("Triton is unavailable (%s): using the torch reference ops on %s",
                       e, device)
        return TORCH_OPS
    logger.info("using the Triton kernels on %s", device)
    return ops
