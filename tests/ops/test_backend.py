"""Op selection: the torch references on the CPU, the Triton kernels on CUDA, chosen when the
model is built; on CUDA a model running the kernels matches the same model on the references."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskloom.models.arch import ArchConfig
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.loader import build_model, init_random_weights
from taskloom.models.weights import materialize
from taskloom.ops.backend import TORCH_OPS, select_ops
from tests.models.single_seq import forward_batch, greedy_batch

CUDA = torch.device("cuda")
# A small Qwen3-style model: GQA (8 query heads on 2 kv heads), per-head q/k norm.
ARCH = ArchConfig(model_type="qwen3", vocab_size=512, hidden_size=256, intermediate_size=512,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=1024, qk_norm=True)
PROMPTS = [list(range(5, 5 + n)) for n in (1, 17, 40, 150)]


def test_cpu_models_use_the_torch_references() -> None:
    assert select_ops(torch.device("cpu")) is TORCH_OPS
    model = build_model(ARCH, torch.float32, torch.device("cpu"))
    assert model.ops is TORCH_OPS
    assert model.model.layers[0].self_attn.ops is TORCH_OPS


def test_cpu_path_never_imports_the_triton_kernels() -> None:
    code = ("import sys, torch; from taskloom.models.loader import build_model; "
            "from tests.ops.test_backend import ARCH, PROMPTS; "
            "from tests.models.single_seq import forward_batch; "
            "forward_batch(build_model(ARCH, torch.float32, torch.device('cpu')), PROMPTS); "
            "assert 'taskloom.ops.triton' not in sys.modules, 'kernels imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_model_matches_torch_references_on_cuda() -> None:
    model = build_model(ARCH, torch.float32, CUDA)
    assert model.ops.name == "triton"
    init_random_weights(model, seed=0)
    with torch.device("meta"):
        reference = LlamaForCausalLM(ARCH)
    materialize(reference, torch.float32, CUDA)
    init_random_weights(reference.eval(), seed=0)
    for ours, expected in zip(forward_batch(model, PROMPTS), forward_batch(reference, PROMPTS)):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert greedy_batch(model, PROMPTS, 12) == greedy_batch(reference, PROMPTS, 12)
