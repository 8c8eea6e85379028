"""Merging LoRA adapters into one: task arithmetic, TIES and DARE, as PEFT computes them.

`merge_adapters` reproduces what PEFT's `LoraModel.add_weighted_adapter(adapters, weights,
name, combination_type=method, density=..., majority_sign_method=...)` computes for the
combination types "linear", "ties" and "dare_linear" (the behaviour of
`_generalized_task_arithmetic_weighted_adapter` and `peft.utils.merge_utils`):

- Like PEFT and LoRAX, the A matrices and the B matrices are merged *separately*, each into a
  matrix of the same rank, so the result is again an ordinary rank-r adapter; this is a cheap
  approximation of merging the updates `scaling * B A` (which would raise the rank).
- Every source is weighted by `sqrt(|weight * scaling|)` on both sides; a negative product
  puts its sign on A only. The merged adapter has scaling 1.0 (PEFT gives it lora_alpha = r).
- All sources must have the same rank (PEFT refuses mixed ranks for these methods too).
- Each (layer, projection) adapted by any source is merged from the sources that adapt it;
  the others contribute nothing there (PEFT skips an adapter a layer lacks).
- A merge of a single source is always "linear" (PEFT's rule): density is ignored.

The methods, applied to the A stack and to the B stack of one projection, `t[i]` being
source i's tensor and `w[i]` its side weight:

- linear, task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", 2023):
  `sum_i w[i] t[i]`.
- ties (Yadav et al., "TIES-Merging", 2023): keep the `int(density * numel)` entries of each
  `t[i]` largest in magnitude; elect a sign per entry from the *unweighted* pruned tensors,
  "total" (sign of their sum) or "frequency" (sign of the sum of their signs), ties going to
  +; then the weighted entries whose sign agrees are summed and divided by how many agreed
  (weights are applied after the election, and the mean is not renormalised by them).
- dare_linear (Yu et al., "Language Models are Super Mario" (DARE), 2024): drop each entry of
  each `t[i]` with probability `1 - density`, scale the kept ones by `1 / density`, then the
  linear sum. The masks come from one `torch.Generator` seeded with `seed`, drawn per
  projection in model order (layer, then q, k, v, o, gate, up, down), A then B, sources in
  order, so a merge is reproducible; with density 1 nothing is drawn or dropped.
"""
from __future__ import annotations

import math

import torch

from taskloom.lora.adapter import TARGETS, LoRAAdapter, LoRAWeights
from taskloom.lora.request import MAJORITY_SIGN_METHODS, MERGE_METHODS


def merge_adapters(name: str, sources: list[tuple[LoRAAdapter, float]], method: str,
                   density: float = 1.0, majority_sign_method: str = "total",
                   seed: int = 0) -> LoRAAdapter:
    """Merge `sources` (adapter, weight) into a new adapter `name` of the same rank with
    scaling 1.0, exactly as PEFT's `add_weighted_adapter` does for `method` in linear, ties,
    dare_linear. ValueError when the arguments or the sources' ranks or shapes disagree."""
    _check_arguments(sources, method, density, majority_sign_method)
    if len(sources) == 1:
        method = "linear"
    rank = sources[0][0].rank
    generator = torch.Generator().manual_seed(seed)
    keys = {key for adapter, _ in sources for key in adapter.weights}
    merged: dict[tuple[int, str], LoRAWeights] = {}
    for key in sorted(keys, key=lambda k: (k[0], TARGETS.index(k[1]))):
        present = [(adapter, weight) for adapter, weight in sources if key in adapter.weights]
        weight_a, weight_b = _side_weights(present)
        a = _stack([adapter.weights[key].a for adapter, _ in present], key, "A")
        b = _stack([adapter.weights[key].b for adapter, _ in present], key, "B")
        merged[key] = LoRAWeights(
            a=_merge_stack(a, weight_a, method, density, majority_sign_method, generator),
            b=_merge_stack(b, weight_b, method, density, majority_sign_method, generator))
    return LoRAAdapter(name, rank, 1.0, merged)


def _check_arguments(sources: list[tuple[LoRAAdapter, float]], method: str, density: float,
                     majority_sign_method: str) -> None:
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {', '.join(MERGE_METHODS)}, "
                         f"got {method!r}")
    if not sources:
        raise ValueError("a merge needs at least one adapter")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of "
                         f"{', '.join(MAJORITY_SIGN_METHODS)}, got {majority_sign_method!r}")
    for adapter, weight in sources:
        if not math.isfinite(weight):
            raise ValueError(f"merge weight of {adapter.name!r} must be finite, got {weight}")
    ranks = {adapter.name: adapter.rank for adapter, _ in sources}
    if len(set(ranks.values())) != 1:
        listed = ", ".join(f"{n!r} has rank {r}" for n, r in ranks.items())
        raise ValueError(f"adapters merged with {method!r} must all have the same rank, but "
                         f"{listed} (merge adapters of one rank)")


def _side_weights(present: list[tuple[LoRAAdapter, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A weights, B weights): sqrt(|weight * scaling|) each, the sign on A only."""
    roots = [math.sqrt(abs(weight * adapter.scaling)) for adapter, weight in present]
    signs = [1.0 if weight * adapter.scaling >= 0 else -1.0 for adapter, weight in present]
    weight_a = torch.tensor([root * sign for root, sign in zip(roots, signs)],
                            dtype=torch.float32)  # [n]
    weight_b = torch.tensor(roots, dtype=torch.float32)  # [n]
    return weight_a, weight_b


def _stack(tensors: list[torch.Tensor], key: tuple[int, str], half: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot merge layer {key[0]} {key[1]}: the sources' lora_{half} "
                         f"shapes differ ({', '.join(str(s) for s in sorted(shapes))})")
    return torch.stack([t.float() for t in tensors])  # [n, rows, cols]


def _merge_stack(stack: torch.Tensor, weights: torch.Tensor, method: str, density: float,
                 majority_sign_method: str, generator: torch.Generator) -> torch.Tensor:
    """Merge a stack of one side's tensors [n, rows, cols] into [rows, cols]."""
    weights = weights.view(-1, *([1] * (stack.dim() - 1)))  # [n, 1, 1]
    if method == "linear":
        return (stack * weights).sum(dim=0)
    if method == "dare_linear":
        if density < 1.0:
            stack = _random_prune(stack, density, generator)
        return (stack * weights).sum(dim=0)
    if density < 1.0:
        stack = _magnitude_prune(stack, density)
    agree = _majority_sign_mask(stack, majority_sign_method)  # [n, rows, cols] bool
    weighted = stack * weights  # [n, rows, cols]
    kept = (weighted * agree).sum(dim=0)  # [rows, cols]
    return kept / torch.clamp(agree.sum(dim=0), min=1.0)


def _magnitude_prune(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries of each source."""
    flat = stack.reshape(stack.shape[0], -1)  # [n, rows * cols]
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    mask.scatter_(1, torch.topk(flat.abs(), k=k, dim=1, largest=True).indices, 1.0)
    return stack * mask.view(stack.shape)


def _majority_sign_mask(stack: torch.Tensor, method: str) -> torch.Tensor:
    """Where each source's sign equals the elected sign of its entry (zeros never agree)."""
    sign = stack.sign()  # [n, rows, cols]
    magnitude = stack.sum(dim=0) if method == "total" else sign.sum(dim=0)  # [rows, cols]
    majority = torch.where(magnitude >= 0, 1.0, -1.0)  # [rows, cols]
    return sign == majority


def _random_prune(stack: torch.Tensor, density: float, generator: torch.Generator
                  ) -> torch.Tensor:
    """DARE: keep each entry with probability density and rescale the kept ones by 1/density."""
    mask = torch.bernoulli(torch.full_like(stack, density), generator=generator)
    return stack * mask / density
