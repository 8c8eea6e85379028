"""taskloom: an LLM serving engine for multi-task workloads.

`from taskloom import LLM, SamplingParams, StructuredOutputs`. `LLM` is imported lazily so that the pure-Python
parts (engine, sampling parameters) can be used without importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskloom.outputs import CompletionOutput, RequestOutput
from taskloom.sampling_params import SamplingParams, StructuredOutputs

if TYPE_CHECKING:
    from taskloom.api import LLM

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from taskloom.api import LLM
        return LLM
    raise AttributeError(f"module 'taskloom' has no attribute {name!r}")
