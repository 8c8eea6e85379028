"""LoRAManager: where adapters live while they are served (S-LoRA's unified memory, simplified).

Two tiers. The host cache keeps up to `max_cpu_loras` adapters' weights in memory, in the
model's dtype and, on CUDA, in pinned memory, so that putting one in a slot is a few copies
the host does not wait for (as vLLM keeps them); least recently used dropped first and
reloaded from their path (or re-merged from their recipe, in float32) when a request needs
them again. The device holds `max_loras` slots inside the model's
LoRALinear buffers; before each step the adapters of that step's batch are put in slots, the
least recently used slot not needed by the batch overwritten first. The scheduler guarantees a
batch never names more adapters than there are slots.

Adapters are checked when they are loaded (`add`), but one dropped from the host cache is read
again from its directory (or merged again) when a batch needs it, and that can fail: the
files may be gone. `prepare` does that reading for a step before anything changes, so the
engine can fail the requests of an adapter that cannot be loaded and run the rest.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from taskloom.config import LoRAConfig
from taskloom.lora.adapter import LoRAAdapter, LoRAWeights, load_peft_adapter
from taskloom.lora.layers import LoRAState, wrap_projections
from taskloom.lora.merge import merge_adapters
from taskloom.lora.metadata import build_lora_metadata
from taskloom.lora.request import LoRARequest
from taskloom.models.arch import ArchConfig
from taskloom.ops.backend import Ops

logger = logging.getLogger(__name__)


class LoRAManager:
    """Host cache, device slots and the per-step metadata of one model's adapters."""

    def __init__(self, model: nn.Module, arch: ArchConfig, config: LoRAConfig, ops: Ops,
                 device: torch.device) -> None:
        self.arch = arch
        self.config = config
        self.device = device
        self.state = LoRAState()
        self.layers = wrap_projections(model, config.max_loras, config.max_lora_rank, ops,
                                       self.state)
        self.dtype = self.layers[0].lora_a.dtype if self.layers else torch.float32
        self._pin = device.type == "cuda"
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._slots: OrderedDict[int, int] = OrderedDict()   # lora id -> slot, LRU first
        self._free_slots = list(range(config.max_loras))
        self._ready: dict[int, LoRAAdapter] = {}   # this step's adapters that need a slot
        self.num_loads = 0        # adapters read from disk or merged
        self.num_slot_writes = 0  # adapters copied into a device slot

    # ----- host cache ------------------------------------------------------------------------
    def add(self, lora: LoRARequest) -> None:
        """Load (and check) an adapter into the host cache now."""
        self._adapter(lora)

    def remove(self, lora_id: int) -> None:
        """Forget an adapter's host copy and free its slot."""
        self._host.pop(lora_id, None)
        slot = self._slots.pop(lora_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def _adapter(self, lora: LoRARequest) -> LoRAAdapter:
        adapter = self._host.get(lora.lora_id)
        if adapter is not None:
            self._host.move_to_end(lora.lora_id)
            return adapter
        adapter = self._materialise(lora)
        self.num_loads += 1
        self._host[lora.lora_id] = adapter
        while len(self._host) > self.config.host_capacity:
            evicted, _ = self._host.popitem(last=False)
            logger.debug("LoRA host cache: evicted adapter id %d", evicted)
        return adapter

    def _materialise(self, lora: LoRARequest) -> LoRAAdapter:
        if lora.path is not None:
            adapter = load_peft_adapter(lora.name, lora.path, self.arch,
                                        self.config.max_lora_rank)
        else:
            spec = lora.merge
            assert spec is not None    # LoRARequest has a path or a recipe
            sources = [(self._adapter(src), weight) for src, weight in spec.sources]
            adapter = merge_adapters(lora.name, sources, spec.method, spec.density,
                                     spec.majority_sign_method, spec.seed)
        return self._host_form(adapter)

    def _host_form(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """The adapter as the host cache keeps it: the slots' dtype, pinned on CUDA."""
        def keep(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.dtype)
            return t.pin_memory() if self._pin else t

        weights = {key: LoRAWeights(keep(w.a), keep(w.b)) for key, w in adapter.weights.items()}
        return LoRAAdapter(adapter.name, adapter.rank, adapter.scaling, weights)

    def prepare(self, loras: list[LoRARequest]) -> dict[int, str]:
        """Hold the host copy of each of a step's adapters that has no slot, loading it again
        if it was dropped; return those that could not be loaded (id -> why). Nothing else
        changes, so their requests can leave the step before it runs."""
        self._ready = {}
        errors: dict[int, str] = {}
        for lora in loras:
            if lora.lora_id in self._slots:
                continue
            try:
                self._ready[lora.lora_id] = self._adapter(lora)
            except Exception as e:     # any failure to read or merge: the adapter's, not ours
                errors[lora.lora_id] = (f"adapter {lora.name!r} could not be loaded again "
                                        f"after it left host memory: {e}")
        return errors

    # ----- device slots ----------------------------------------------------------------------
    def assign_slots(self, seq_loras: list[LoRARequest | None]) -> list[int]:
        """Put the batch's adapters in slots; each sequence's slot (-1: no adapter)."""
        needed = {lora.lora_id: lora for lora in seq_loras if lora is not None}
        if len(needed) > self.config.max_loras:
            raise RuntimeError(f"a batch names {len(needed)} adapters but there are "
                               f"{self.config.max_loras} slots (a scheduler bug)")
        slots = {lid: self._slot_for(lora, needed) for lid, lora in needed.items()}
        self._ready = {}
        return [-1 if lora is None else slots[lora.lora_id] for lora in seq_loras]

    def set_step(self, seq_slots: list[int], seq_num_tokens: list[int]) -> None:
        """Set an eagerly run step's token -> slot metadata (a CUDA graph reads the slots
        from its static buffer instead)."""
        if all(slot < 0 for slot in seq_slots):
            self.state.meta = None
            return
        token_slots: list[int] = []
        for slot, n in zip(seq_slots, seq_num_tokens):
            token_slots.extend([slot] * n)
        self.state.meta = build_lora_metadata(token_slots, self.device)

    def _slot_for(self, lora: LoRARequest, needed: dict[int, LoRARequest]) -> int:
        slot = self._slots.get(lora.lora_id)
        if slot is not None:
            self._slots.move_to_end(lora.lora_id)
            return slot
        adapter = self._ready.get(lora.lora_id) or self._adapter(lora)   # before taking a slot
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next(lid for lid in self._slots if lid not in needed)
            slot = self._slots.pop(victim)
        for layer in self.layers:
            layer.set_slot(slot, adapter)
        self.num_slot_writes += 1
        self._slots[lora.lora_id] = slot
        return slot
