"""Test helper: the embedded SmolLM2-135M GGUF read by HF transformers itself (its own
dequantization, q/k un-permutation and config), as the reference model of fidelity tests."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import transformers
from filelock import FileLock
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from taskloom.models.embedded import embedded_model_path


def load_hf_smollm() -> transformers.PreTrainedModel:
    """`from_pretrained(gguf_file=...)` would need `accelerate`; this is the same
    `load_gguf_checkpoint` it calls, into a model built from the config. Each call builds a
    fresh model (tests wrap it in adapters) from one reading of the file per test session."""
    config, state = _read_gguf()
    with no_init_weights():                                 # every weight comes from the file
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to embed_tokens
    hf.tie_weights()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


@functools.cache
def _read_gguf() -> tuple[transformers.PretrainedConfig, dict[str, torch.Tensor]]:
    """HF's config and dequantized tensors of the embedded file: parsing it takes HF's
    reader 20-30 s, so the fidelity modules share one reading (and pytest-xdist's workers
    one file of it: `_shared`)."""
    path = embedded_model_path()
    directory, name = os.path.dirname(path), os.path.basename(path)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)

    def read() -> dict[str, torch.Tensor]:
        import gguf     # here: the device image lacks it, and e2e tests import this module
        with no_init_weights():
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF maps the names afresh for each of the model's 397 modules, rebuilding gguf's
        # table of every name each time (10 s of the 23); the table depends only on the
        # architecture and the depth
        with mock.patch("gguf.get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)):
            return load_gguf_checkpoint(path, return_tensors=True,
                                        model_to_load=skeleton)["tensors"]

    return config, _shared(f"hf-{name}-{transformers.__version__}.safetensors", read)


def _shared(name: str, read: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`read()`, once for all of a run's workers where tests/conftest.py gives them a shared
    directory: the first worker to ask reads and saves it there, the others load the file."""
    shared = os.environ.get("TASKLOOM_TESTS_SHARED_DIR")
    if shared is None:
        return read()
    file = Path(shared) / name
    with FileLock(f"{file}.lock"):
        if file.exists():
            return load_file(file)
        tensors = read()
        partial = file.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, partial)
        os.replace(partial, file)
        return tensors


@functools.cache
def load_hf_smollm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """HF's tokenizer read from the embedded file (one reading per test session; callers
    must not change it)."""
    path = embedded_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
