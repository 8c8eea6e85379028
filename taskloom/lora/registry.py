"""LoRARegistry: the adapters users can name, for the offline API and the server alike.

Pure Python. Names map to `LoRARequest`s with fresh engine ids; a merge of loaded adapters
(`merged`) is named by its recipe and registered once, so repeated requests for the same mix
share its id, its device slot and its prefix-cache blocks.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

from taskloom.lora.request import LoRARequest, MergeSpec

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class LoRARegistry:
    """Name -> adapter. The registry only names; whoever owns the engine loads each new
    adapter (`reserve`, then the engine's `add_lora`, then `discard` if that fails) and
    unloads the ids `remove` returns."""

    def __init__(self, reserved: tuple[str, ...] = ()) -> None:
        self._reserved = reserved
        self._next_id = 1      # ids are never reused (a plain int: the registry pickles)
        self._by_name: dict[str, LoRARequest] = {}
        self._merges: dict[MergeSpec, LoRARequest] = {}

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    @property
    def adapters(self) -> list[LoRARequest]:
        return list(self._by_name.values())

    def resolve(self, name: str) -> LoRARequest:
        lora = self._by_name.get(name)
        if lora is None:
            known = ", ".join(self._by_name) or "none loaded"
            raise KeyError(f"no adapter named {name!r} (adapters: {known})")
        return lora

    def reserve(self, name: str, path: str) -> LoRARequest:
        """Name the PEFT adapter at `path` (a fresh id); ValueError if the name is invalid
        or taken."""
        if not _NAME_RE.match(name):
            raise ValueError(f"adapter name {name!r} is invalid: use 1-128 letters, digits and "
                             f". _ : / -, starting with a letter or digit")
        if name in self._by_name or name in self._reserved:
            raise ValueError(f"the name {name!r} is already in use")
        lora = LoRARequest(name, self._new_id(), path=os.path.abspath(path))
        self._by_name[name] = lora
        return lora

    def discard(self, lora: LoRARequest) -> None:
        """Forget a reservation or merge whose loading failed."""
        if self._by_name.get(lora.name) == lora:
            del self._by_name[lora.name]
        if lora.merge is not None and self._merges.get(lora.merge) == lora:
            del self._merges[lora.merge]

    def remove(self, name: str) -> list[int]:
        """Unregister `name` and the merges made from it; returns the ids to unload.
        Requests already running with them finish normally."""
        lora = self.resolve(name)
        del self._by_name[name]
        ids = [self._merges.pop(spec).lora_id for spec in list(self._merges)
               if any(src == lora for src, _ in spec.sources)]
        return ids + [lora.lora_id]

    def merged(self, weights: Mapping[str, float], method: str = "linear",
               density: float = 1.0, majority_sign_method: str = "total",
               seed: int = 0) -> tuple[LoRARequest, bool]:
        """The composite of loaded adapters `weights` (name -> weight) merged by `method`, and
        whether it is new (then the engine must load it). KeyError for an unknown name."""
        sources = tuple((self.resolve(name), float(w)) for name, w in weights.items())
        spec = MergeSpec(sources, method, density, majority_sign_method, seed)
        lora = self._merges.get(spec)
        if lora is not None:
            return lora, False
        desc = "+".join(f"{w:g}*{src.name}" for src, w in sources)
        lora = LoRARequest(f"merge:{method}({desc})", self._new_id(), merge=spec)
        self._merges[spec] = lora
        return lora, True
