"""Model loading: resolve a path, read the architecture, build on the meta device, materialise
each parameter in the target dtype and device, and copy each checkpoint tensor straight into
place (never a second full copy of the model).

Sources: a Hugging Face directory (config.json + safetensors), a GGUF file (detected by
content, not by name), the embedded default (SmolLM2-135M-Instruct GGUF), or random weights for
a named shape (`taskloom.models.shapes`) or a config.json. With `quantization="gguf"`, a GGUF
file's 4-bit projections are swapped for 4-bit linears on the meta device and read into them
as they are (`taskloom.ops.int4_linear`), and a Q8_0 lm head is also kept 8-bit. A bf16 CPU
model takes the logits of a few rows from a C loop (`taskloom.ops.small_linear`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from taskloom.config import ModelConfig
from taskloom.models.arch import ArchConfig
from taskloom.models.embedded import embedded_model_path
from taskloom.models.llama import LlamaForCausalLM, RMSNorm
from taskloom.models.safetensors_weights import SafetensorsCheckpoint
from taskloom.models.shapes import SHAPES, shape_config
from taskloom.models.weights import materialize
from taskloom.ops.backend import cpu_kernels_enabled, select_ops
from taskloom.ops.int4_linear import int4_supported, swap_int4_linears
from taskloom.ops.small_linear import (Q8_GROUP, SMALL_BATCH_MAX_ROWS, SmallBatchHead,
                                      small_linear_worthwhile)
from taskloom.runtime.dtypes import TORCH_DTYPES

if TYPE_CHECKING:
    from taskloom.models.gguf_weights import GGUFCheckpoint

logger = logging.getLogger(__name__)

RANDOM_INIT_STD = 0.02


@dataclass
class LoadedModel:
    """A ready model, its architecture, and where it came from (None for a named shape)."""

    model: LlamaForCausalLM
    arch: ArchConfig
    path: str | None


def resolve_model_path(model: str | None) -> str:
    """The file or directory to load: `model` itself, or the embedded GGUF for None."""
    if model is None:
        return embedded_model_path()
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        hint = " (named shapes need random weights)" if model in SHAPES else ""
        raise FileNotFoundError(f"model path {model!r} does not exist; expected a Hugging Face "
                                f"model directory or a GGUF file{hint}")
    return path


def build_model(arch: ArchConfig, dtype: torch.dtype, device: torch.device,
                int4: set[str] = frozenset()) -> LlamaForCausalLM:
    """Build on the meta device, then give each parameter uninitialised storage in place.
    The ops every layer calls are chosen here, once, for `device` and `dtype`; the
    projections named in `int4` become 4-bit linears first."""
    ops = select_ops(device, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, ops)
    swap_int4_linears(model, int4)
    materialize(model, dtype, device)
    return model.eval()


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load (or randomly initialise) the model `cfg` describes."""
    start = time.perf_counter()
    dtype, device = TORCH_DTYPES[cfg.dtype], torch.device(cfg.device)
    if cfg.random_weights:
        arch, path = random_arch(cfg.model)
        _check_max_model_len(cfg, arch)
        model = build_model(arch, dtype, device)
        init_random_weights(model, cfg.seed)
        _attach_small_batch_head(model, None)
    else:
        path = resolve_model_path(cfg.model)
        arch, weights, int4, gguf = _open_checkpoint(path, cfg.quantization)
        _check_max_model_len(cfg, arch)
        model = build_model(arch, dtype, device, int4)
        model.load_weights(weights)
        _attach_small_batch_head(model, gguf if cfg.quantization == "gguf" else None)
    logger.info("loaded %s (%s, %d layers, %.1f MB of weights) as %s on %s (%s ops) in %.1fs",
                path or cfg.model, arch.model_type, arch.num_hidden_layers,
                sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6,
                cfg.dtype, device, model.ops.name, time.perf_counter() - start)
    return LoadedModel(model=model, arch=arch, path=path)


def _open_checkpoint(path: str, quantization: str | None
                     ) -> tuple[ArchConfig, Iterator[tuple[str, object]], set[str],
                                GGUFCheckpoint | None]:
    """The architecture, the weights to load, the projections kept 4-bit, and the GGUF file
    (None for a Hugging Face directory)."""
    if os.path.isdir(path):
        if quantization is not None:
            raise ValueError(f"quantization {quantization!r} keeps a GGUF file's 4-bit "
                             f"weights; {path} is a Hugging Face directory")
        hf = SafetensorsCheckpoint(path)
        return hf.arch_config(), hf.weights(), set(), None
    # imported here: the gguf package is needed only for GGUF files (the GPU image lacks it)
    from taskloom.models.gguf_weights import GGUFCheckpoint
    gguf = GGUFCheckpoint(path)
    arch = gguf.arch_config()
    int4 = _int4_projections(gguf) if quantization == "gguf" else set()
    return arch, gguf.weights(arch, int4), int4, gguf


def _attach_small_batch_head(model: LlamaForCausalLM, gguf: GGUFCheckpoint | None) -> None:
    """Give a bf16 CPU model its small-batch head (`taskloom.ops.small_linear`): over the
    Q8_0 head of `gguf` kept 8-bit where it has one, else over its own bf16 head; where the
    C kernel runs faster than `F.linear` (`small_linear_worthwhile`) and the C kernels are
    not switched off (`TASKLOOM_CPU_KERNELS=0`)."""
    head = model.lm_head_weight()
    if (head.device.type != "cpu" or head.dtype != torch.bfloat16 or not cpu_kernels_enabled()
            or head.shape[1] % Q8_GROUP or not small_linear_worthwhile()):
        return
    weight = None if gguf is None else gguf.q8_head()
    if weight is not None and tuple(weight.shape) != tuple(head.shape):
        raise ValueError(f"{gguf.path}: the Q8_0 lm head is {tuple(weight.shape)}, the model's "
                         f"{tuple(head.shape)}")
    model.small_batch_head = SmallBatchHead(head if weight is None else weight)
    logger.info("logits of up to %d rows: a C loop over the %s", SMALL_BATCH_MAX_ROWS,
                "bf16 head" if weight is None else
                f"Q8_0 head kept 8-bit ({model.small_batch_head.nbytes / 1e6:.1f} MB)")


def _int4_projections(gguf: GGUFCheckpoint) -> set[str]:
    """The projections `gguf` stores 4-bit, checked against this machine's int4 support."""
    if not int4_supported(torch.bfloat16):
        raise ValueError("quantization 'gguf': this torch has no CPU int4 kernel whose "
                         "weight layout taskloom reads; run without it (weights dequantized)")
    int4 = gguf.int4_projections()
    if not int4:
        logger.warning("quantization 'gguf': %s stores no decoder projection 4-bit (Q4_0, "
                       "Q4_1, Q4_K); every weight is dequantized", gguf.path)
    else:
        logger.info("quantization 'gguf': %d projections kept 4-bit", len(int4))
    return int4


def _check_max_model_len(cfg: ModelConfig, arch: ArchConfig) -> None:
    if cfg.max_model_len is not None and cfg.max_model_len > arch.max_position_embeddings:
        raise ValueError(f"max_model_len ({cfg.max_model_len}) exceeds the model's "
                         f"max_position_embeddings ({arch.max_position_embeddings})")


def random_arch(model: str | None) -> tuple[ArchConfig, str | None]:
    """ArchConfig for random weights: a named shape (path None) or a config.json path (or a
    directory holding one; its directory is returned as the path)."""
    if model in SHAPES:
        return ArchConfig.from_hf_dict(shape_config(model)), None
    if model is None or not os.path.exists(model):
        raise ValueError(f"random_weights needs a named shape ({', '.join(SHAPES)}) or a path "
                         f"to a config.json, got {model!r}")
    config_path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        return ArchConfig.from_hf_dict(config), os.path.dirname(os.path.abspath(config_path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise ValueError(f"cannot read a model config from {config_path}: "
                         f"{type(e).__name__}: {e}") from None


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic init on the parameters' device: norms 1, biases 0, all else N(0, 0.02)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif name == "bias":
                param.zero_()
            else:
                param.normal_(0.0, RANDOM_INIT_STD, generator=generator)
