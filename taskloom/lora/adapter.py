"""LoRA adapters in PEFT's format, loaded and checked against the model they are served on.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` with tensors
named like `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
`...lora_B.weight` (`[out, r]`). Each adapted projection adds `scaling * B A x`, where scaling
is `lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`). taskloom serves adapters on the
attention and MLP projections; anything it cannot serve exactly (other target modules, DoRA,
trained biases, per-module rank patterns, extra saved modules) is refused with a message that
names it, never silently ignored.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from taskloom.models.arch import ArchConfig

# The projections an adapter may target, in the order of the fused linears they live in.
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTN_TARGETS + MLP_TARGETS

_TENSOR_RE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(TARGETS) +
    r")\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$")


def target_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection an adapter may target."""
    h, inter = arch.hidden_size, arch.intermediate_size
    return {"q_proj": (h, arch.q_size), "k_proj": (h, arch.kv_size),
            "v_proj": (h, arch.kv_size), "o_proj": (arch.q_size, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass
class LoRAWeights:
    """One adapted projection of one layer: the update is `scaling * b @ a`."""

    a: torch.Tensor   # [r, in] float32 as read (the host cache keeps the model's dtype)
    b: torch.Tensor   # [out, r]


@dataclass
class LoRAAdapter:
    """An adapter's weights on the host, keyed by (layer index, projection name)."""

    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], LoRAWeights]

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.weights)

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def load_peft_adapter(name: str, path: str, arch: ArchConfig, max_rank: int) -> LoRAAdapter:
    """Read and check a PEFT LoRA directory; ValueError names whatever does not fit."""
    config = _read_config(name, path)
    rank = int(config.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise ValueError(f"adapter {name!r} has rank {rank}, but this engine serves ranks 1 to "
                         f"{max_rank} (raise --max-lora-rank / max_lora_rank)")
    scaling = lora_scaling(float(config.get("lora_alpha", rank)), rank,
                           bool(config.get("use_rslora", False)))
    weights = _read_weights(name, path, arch, rank)
    _check_targets(name, config, weights)
    return LoRAAdapter(name, rank, scaling, weights)


def _read_config(name: str, path: str) -> dict:
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"adapter {name!r}: {path!r} is not a PEFT adapter directory "
                         f"(no adapter_config.json)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    bad = [f"{key}={config.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"adapter {name!r} uses {', '.join(bad)}, which taskloom does not "
                         f"serve (plain LoRA on {', '.join(TARGETS)} only)")
    return config


def _read_weights(name: str, path: str, arch: ArchConfig, rank: int
                  ) -> dict[tuple[int, str], LoRAWeights]:
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise ValueError(f"adapter {name!r}: no adapter_model.safetensors in {path!r}")
    shapes = target_shapes(arch)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            match = _TENSOR_RE.search(key)
            if match is None:
                raise ValueError(f"adapter {name!r} has tensor {key!r}, which is not a LoRA "
                                 f"A/B matrix of {', '.join(TARGETS)}")
            layer, module, half = int(match.group(1)), match.group(2), match.group(3)
            if layer >= arch.num_hidden_layers:
                raise ValueError(f"adapter {name!r} adapts layer {layer}, but the model has "
                                 f"{arch.num_hidden_layers} layers")
            in_f, out_f = shapes[module]
            want = (rank, in_f) if half == "A" else (out_f, rank)
            tensor = f.get_tensor(key)
            if tuple(tensor.shape) != want:
                raise ValueError(f"adapter {name!r}: {key} has shape {tuple(tensor.shape)}, "
                                 f"expected {want} for this model at rank {rank}")
            halves.setdefault((layer, module), {})[half] = tensor.float()
    weights = {}
    for key, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {name!r}: layer {key[0]} {key[1]} has lora_"
                             f"{''.join(pair)} but not its other half")
        weights[key] = LoRAWeights(pair["A"], pair["B"])
    if not weights:
        raise ValueError(f"adapter {name!r} has no LoRA weights in {file!r}")
    return weights


def _check_targets(name: str, config: dict, weights: dict[tuple[int, str], LoRAWeights]
                   ) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"adapter {name!r} targets {', '.join(unknown)}; taskloom serves "
                             f"LoRA on {', '.join(TARGETS)}")
