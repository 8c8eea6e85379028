"""Parameter-level weight loading helpers shared by model definitions and loaders.

Every parameter of a model carries a `weight_loader(param, loaded_weight, shard_id=None)`
attribute that copies one Hugging Face-layout tensor into place: the whole parameter, or one
shard of a fused parameter (`q`/`k`/`v` rows of `qkv_proj`, `0`/`1` halves of `gate_up_proj`).
Fused parameters also carry `shard_ids`, the shards that must all arrive before they are
complete. `materialize` turns a meta-device model into real storage without losing these
attributes (`nn.Module.to_empty` replaces parameters and drops them).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Hashable], None]


def set_weight_attrs(param: nn.Parameter, **attrs: Any) -> None:
    """Attach loading attributes (`weight_loader`, `shard_ids`) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise ValueError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def _check_shape(expected: torch.Size, got: torch.Size) -> None:
    if tuple(expected) != tuple(got):
        raise ValueError(f"expected shape {tuple(expected)}, got {tuple(got)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: Hashable = None) -> None:
    """Copy a whole tensor of the parameter's shape (casting dtype, moving device)."""
    if shard_id is not None:
        raise ValueError(f"parameter is not fused, got shard {shard_id!r}")
    _check_shape(param.shape, loaded_weight.shape)
    with torch.no_grad():
        param.copy_(loaded_weight)


def sharded_weight_loader(shards: dict[Hashable, tuple[int, int]]) -> WeightLoader:
    """A loader for a parameter fused along dim 0: `shards[id] = (row_offset, num_rows)`."""

    def load(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Hashable = None) -> None:
        if shard_id not in shards:
            raise ValueError(f"fused parameter takes shards {list(shards)}, got {shard_id!r}")
        offset, size = shards[shard_id]
        target = param.narrow(0, offset, size)                # [size, ...]
        _check_shape(target.shape, loaded_weight.shape)
        with torch.no_grad():
            target.copy_(loaded_weight)

    return load


def materialize(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give every meta parameter real (uninitialised) storage of `dtype` on `device`.

    Parameters that already hold data are converted instead. Floating-point parameters take
    `dtype`; attributes such as `weight_loader` are kept;
    parameters shared between modules stay shared. Buffers that already hold data (e.g. the
    rotary cos/sin table) keep their dtype and move to `device`.
    """
    done: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                done[id(param)] = _materialize_param(param, dtype, device)
            setattr(sub, name, done[id(param)])
        for name, buf in list(sub._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta:
                raise ValueError(f"buffer {name!r} of {type(sub).__name__} has no data to move")
            sub._buffers[name] = buf.to(device)


def _materialize_param(param: nn.Parameter, dtype: torch.dtype,
                       device: torch.device) -> nn.Parameter:
    target_dtype = dtype if param.dtype.is_floating_point else param.dtype
    if param.is_meta:
        data = torch.empty(param.shape, dtype=target_dtype, device=device)
    else:
        data = param.detach().to(device=device, dtype=target_dtype)
    new = nn.Parameter(data, requires_grad=False)
    new.__dict__.update(param.__dict__)
    return new
