"""Model dtypes by name, what `auto` means on a device, and the device checked before anything
is built on it.

`auto` (the CLI's default, as vLLM's) is the fastest dtype the device computes natively:
bf16 on a CUDA GPU that has it (else fp16), bf16 on a CPU with AVX512-BF16 or AMX (oneDNN's
packed bf16 GEMMs, see `taskloom.ops.linear`: about twice fp32's prefill and batched decode
there), fp32 on any other CPU. fp32 stays the Python API's default: it is the oracle the tests
hold every other path to.
"""
from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *TORCH_DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def cpu_supports(check: str) -> bool:
    """torch's private CPU feature check `torch.cpu.<check>()` (False where this torch has
    none of that name): `_is_avx512_bf16_supported`, `_is_amx_tile_supported`, ..."""
    return bool(getattr(torch.cpu, check, lambda: False)())


def cpuinfo_values(field: str) -> list[str]:
    """The distinct values of a `/proc/cpuinfo` field (`model name`, `flags`), in order; none
    where the system has no such file."""
    values: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field and value.strip() not in values:
                    values.append(value.strip())
    except OSError:
        pass
    return values


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    return cpu_supports("_is_avx512_bf16_supported") or cpu_supports("_is_amx_tile_supported")


def check_device(device: str) -> torch.device:
    """`device` parsed, or ValueError naming what is wrong: not a CPU or CUDA device, or a CUDA
    device this machine does not have."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be cpu or cuda (cuda:N for one of several GPUs), got "
                         f"{device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"device {device!r}: {why} (torch {torch.__version__}); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA "
                             f"devices here")
    return parsed


def resolve_dtype(dtype: str, device: str) -> str:
    """`dtype` itself, or for `auto` the dtype it means on `device` (see the module's text);
    ValueError for a dtype not named here or a device that is not there (`check_device`)."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    kind = check_device(device).type
    if dtype != "auto":
        return dtype
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"
