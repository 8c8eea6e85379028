"""LoRAMetadata: which adapter slot each token of a flat batch uses, built once per step.

Tokens of one sequence are contiguous in the flat batch and share its adapter, so the batch
is described both per token (`token_slots`, for gather-style kernels and CUDA graphs) and as
segments: maximal runs of consecutive tokens with the same slot (for segment-wise kernels and
the torch reference). Slot -1 means no adapter: those tokens get the base projection only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from taskloom.runtime.transfer import to_device


@dataclass
class LoRAMetadata:
    token_slots: torch.Tensor       # [num_tokens] int32, -1 for no adapter
    seg_starts: torch.Tensor        # [num_segs + 1] int32: segment i is tokens [s[i], s[i+1])
    seg_slots: torch.Tensor         # [num_segs] int32, -1 for no adapter
    seg_starts_cpu: list[int]       # host copies, so the reference path never syncs
    seg_slots_cpu: list[int]
    max_seg_len: int
    # Derived once per step by the torch reference ops and shared by every layer.
    ref_plan: Any = None

    @property
    def num_tokens(self) -> int:
        return self.seg_starts_cpu[-1]

    @property
    def has_adapters(self) -> bool:
        return any(s >= 0 for s in self.seg_slots_cpu)


def build_lora_metadata(token_slots: list[int], device: torch.device) -> LoRAMetadata:
    """Metadata for a flat batch whose token i uses adapter slot `token_slots[i]` (-1: none)."""
    starts: list[int] = []
    slots: list[int] = []
    for i, s in enumerate(token_slots):
        if not slots or s != slots[-1]:
            starts.append(i)
            slots.append(s)
    starts.append(len(token_slots))
    max_len = max((b - a for a, b in zip(starts, starts[1:])), default=0)
    return LoRAMetadata(
        token_slots=to_device(token_slots, torch.int32, device),
        seg_starts=to_device(starts, torch.int32, device),
        seg_slots=to_device(slots, torch.int32, device),
        seg_starts_cpu=starts, seg_slots_cpu=slots, max_seg_len=max_len)
