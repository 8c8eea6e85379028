"""Hugging Face checkpoint directories: config.json plus safetensors weights.

Weights come from a single `model.safetensors` or from the shards listed in
`model.safetensors.index.json`, read with `safetensors.safe_open` (memory-mapped) one tensor at
a time, so loading never holds a second copy of the model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open

from taskloom.models.arch import ArchConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """A Hugging Face model directory; raises ValueError when it is not a usable one."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.config = _read_json(os.path.join(directory, "config.json"), directory)
        self.files = self._weight_files()

    def arch_config(self) -> ArchConfig:
        """ArchConfig from config.json (see `ArchConfig.from_hf_dict`)."""
        try:
            return ArchConfig.from_hf_dict(self.config)
        except KeyError as e:
            raise ValueError(f"{self.directory}/config.json lacks {e.args[0]!r}") from None

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor as (HF name, tensor in its stored dtype), one at a time."""
        for path in self.files:
            with _open_safetensors(path) as handle:
                for name in handle.keys():
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as e:  # safetensors raises its own SafetensorError
                        raise ValueError(f"{path} is not a valid safetensors file: tensor "
                                         f"{name!r}: {e}") from None
                    yield name, tensor

    def _weight_files(self) -> list[str]:
        single = os.path.join(self.directory, SINGLE_FILE)
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(single):
            return [single]
        if not os.path.isfile(index):
            raise ValueError(f"{self.directory} has no weights: expected {SINGLE_FILE} or "
                             f"{INDEX_FILE}")
        weight_map = _read_json(index, self.directory).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' of tensor names to files")
        files = [os.path.join(self.directory, f) for f in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard {path} listed in {index} does not exist")
        return files


def _open_safetensors(path: str) -> Any:
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError or OSError, depending on what is wrong
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def _read_json(path: str, directory: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {os.path.basename(path)}; expected a Hugging Face "
                         f"model directory (config.json and safetensors weights) or a GGUF file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
