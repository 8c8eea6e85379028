"""LoRARequest: the adapter a request is served with, as the engine and runner see it.

Pure Python (the engine imports it). An adapter is known by a name to users and by an id
inside the engine: ids are never reused, so an adapter unloaded and loaded again under the
same name gets a new id, and no KV block or device slot of the old one is ever taken for it.
A composite adapter (several loaded adapters merged with weights) carries its recipe in
`merge` and is materialised by the runner the first time a batch needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MERGE_METHODS = ("linear", "ties", "dare_linear")
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeSpec:
    """How a composite adapter is made from loaded ones (the semantics of PEFT's
    `add_weighted_adapter`: A and B merged separately, each weighted by sqrt(w * scaling))."""

    sources: tuple[tuple[LoRARequest, float], ...]
    method: str = "linear"
    density: float = 1.0                 # ties, dare_linear: fraction of entries kept
    majority_sign_method: str = "total"  # ties
    seed: int = 0                        # dare_linear: the random drop masks

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"merge method must be one of {', '.join(MERGE_METHODS)}, "
                             f"got {self.method!r}")
        if not self.sources:
            raise ValueError("a merge needs at least one adapter")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of "
                             f"{', '.join(MAJORITY_SIGN_METHODS)}, got "
                             f"{self.majority_sign_method!r}")
        for src, weight in self.sources:
            if src.merge is not None:
                raise ValueError(f"adapter {src.name!r} is itself a merge; merge loaded "
                                 f"adapters only")
            if not math.isfinite(weight) or weight == 0:
                raise ValueError(f"merge weights must be finite and non-zero (negative ones "
                                 f"subtract a task), got {weight} for {src.name!r}")


@dataclass(frozen=True)
class LoRARequest:
    """A loaded adapter (`path`) or a composite one (`merge`), by name and engine id."""

    name: str
    lora_id: int
    path: str | None = None
    merge: MergeSpec | None = None

    def __post_init__(self) -> None:
        if self.lora_id < 1:
            raise ValueError(f"lora_id must be >= 1, got {self.lora_id}")
        if (self.path is None) == (self.merge is None):
            raise ValueError("a LoRARequest has either a path or a merge recipe")
