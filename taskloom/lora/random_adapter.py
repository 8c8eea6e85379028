"""Random LoRA adapters written in PEFT's on-disk format, for benchmarks and tests that need
many adapters and no training: `adapter_config.json` plus `adapter_model.safetensors` with
PEFT's tensor names, exactly what `PeftModel.save_pretrained` writes for a plain LoRA."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from taskloom.lora.adapter import ATTN_TARGETS, TARGETS, target_shapes
from taskloom.models.arch import ArchConfig


def write_random_adapter(path: str, arch: ArchConfig, rank: int, seed: int,
                         targets: Sequence[str] = TARGETS, lora_alpha: float | None = None,
                         std: float = 0.02, dtype: torch.dtype = torch.float32) -> str:
    """Write a rank-`rank` adapter on `targets` of every layer, A and B drawn from
    N(0, std^2) with `seed` and stored in `dtype`; returns `path`."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; choose from {', '.join(TARGETS)}")
    gen = torch.Generator().manual_seed(seed)
    shapes = target_shapes(arch)
    tensors = {}
    for layer in range(arch.num_hidden_layers):
        for module in targets:
            in_f, out_f = shapes[module]
            block = "self_attn" if module in ATTN_TARGETS else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                std * torch.randn(rank, in_f, generator=gen)).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (
                std * torch.randn(out_f, rank, generator=gen)).to(dtype)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": rank if lora_alpha is None else lora_alpha,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return path
