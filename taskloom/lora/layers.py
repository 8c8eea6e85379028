"""LoRALinear: a projection that adds each token's own adapter term to the base output.

Swapped in for the model's projections after the weights are loaded (the model definition
knows nothing of adapters, as it knows nothing of quantization). The base projection stays
one dense matmul over the whole batch; the adapters' low-rank terms are added by the batched
shrink/expand ops of `taskloom.ops.lora` over stacked per-slot weights:

  lora_a: [max_loras, num_subs * max_rank, in]    lora_b: [max_loras, out, max_rank]

A fused projection (q/k/v, gate/up) holds one rank block per sub-projection: sub j's A rows
are `j*R : j*R + r`, and its B fills the first r columns of its own output rows (`out_slices`),
so the fused projection's adapter term is one shrink and one expand whose sub-projections
each read their block of the shrink's output. Scaling is folded into B.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taskloom.lora.adapter import LoRAAdapter
from taskloom.lora.metadata import LoRAMetadata
from taskloom.ops.backend import Ops
from taskloom.ops.int4_linear import Int4Linear


@dataclass
class LoRAState:
    """The current step's token -> slot mapping, shared by every LoRALinear of one model
    (set by the runner before each forward; None: no adapter in this step)."""

    meta: LoRAMetadata | None = None


class LoRALinear(nn.Module):
    """`base(x)` plus, for every token with an adapter slot, that slot's `B A x`."""

    def __init__(self, base: nn.Linear, layer: int, subs: tuple[tuple[str, int], ...],
                 max_loras: int, max_rank: int, ops: Ops, state: LoRAState) -> None:
        super().__init__()
        if sum(size for _, size in subs) != base.out_features:
            raise ValueError(f"sub-projections {subs} do not add up to {base.out_features}")
        self.base = base
        self.layer = layer
        self.subs = subs
        self.max_rank = max_rank
        self.ops = ops
        self.state = state
        dtype = base.compute_dtype if isinstance(base, Int4Linear) else base.weight.dtype
        device = base.weight.device
        k = len(subs) * max_rank
        self.register_buffer("lora_a", torch.zeros(max_loras, k, base.in_features,
                                                   dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, base.out_features, max_rank,
                                                   dtype=dtype, device=device),
                             persistent=False)
        offsets = [sum(size for _, size in subs[:j]) for j in range(len(subs))]
        self.out_slices = tuple((o, size) for o, (_, size) in zip(offsets, subs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                     # [n, out]
        meta = self.state.meta
        if meta is not None and meta.has_adapters:
            t = self.ops.lora_shrink(x, self.lora_a, meta)   # [n, K] float32
            self.ops.lora_expand(t, self.lora_b, meta, y, self.out_slices)
        return y

    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Write `adapter`'s weights for this layer into `slot` (zeros: none there). Host
        weights already in the buffers' dtype (pinned, on CUDA) are copied without waiting;
        the scaling is applied on the device."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if adapter is None:
            return
        for j, ((module, _), (row, size)) in enumerate(zip(self.subs, self.out_slices)):
            w = adapter.weights.get((self.layer, module))
            if w is not None:      # rank <= max_rank: checked when the adapter was loaded
                r = w.a.shape[0]
                a = self.lora_a[slot, j * self.max_rank:j * self.max_rank + r]   # [r, in]
                a.copy_(w.a, non_blocking=True)
                b = self.lora_b[slot, row:row + size, :r]                        # [size, r]
                b.copy_(w.b, non_blocking=True)
                if adapter.scaling != 1.0:
                    b.mul_(adapter.scaling)


def wrap_projections(model: nn.Module, max_loras: int, max_rank: int, ops: Ops,
                     state: LoRAState) -> list[LoRALinear]:
    """Replace every decoder layer's q/k/v, o, gate/up and down projections of a loaded
    Llama-family model with LoRALinear modules sharing `state`; returns them."""
    arch = model.config
    q, kv, inter, h = arch.q_size, arch.kv_size, arch.intermediate_size, arch.hidden_size
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        plan = [(attn, "qkv_proj", (("q_proj", q), ("k_proj", kv), ("v_proj", kv))),
                (attn, "o_proj", (("o_proj", h),)),
                (mlp, "gate_up_proj", (("gate_proj", inter), ("up_proj", inter))),
                (mlp, "down_proj", (("down_proj", h),))]
        for parent, attr, subs in plan:
            lora = LoRALinear(getattr(parent, attr), i, subs, max_loras, max_rank, ops, state)
            setattr(parent, attr, lora)
            wrapped.append(lora)
    return wrapped
