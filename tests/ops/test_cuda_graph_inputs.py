"""What CUDA-graph decode steps and GPU memory sizing do on the host, tested on the CPU: the
bucket sizes, the padded static inputs, a forward over them (the Triton kernels through the
interpreter) against the unpadded eager forward, and the KV budget arithmetic and profiling
step. The capture and replay themselves run in tests/e2e/test_cuda_graphs.py (gpu)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from taskloom import LLM
from taskloom.cli import add_engine_args
from taskloom.config import ModelConfig
from taskloom.models.arch import ArchConfig
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.loader import build_model, init_random_weights
from taskloom.models.weights import materialize
from taskloom.runtime.cuda_graphs import DecodeInputs, bucket_size, default_capture_sizes
from taskloom.runtime.memory import (
    GRAPH_OVERHEAD_BYTES,
    MemoryProfile,
    _profile_forward,
    _profile_sampler,
    _profile_seq_lens,
    kv_cache_bytes,
)
from taskloom.runtime.model_runner import ModelRunner
from tests.models.single_seq import make_metadata, new_kv_caches

CPU = torch.device("cpu")
BLOCK_SIZE = 16
ARCH_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "max_position_embeddings": 2048}
ARCH = ArchConfig.from_hf_dict(ARCH_HF)
GIB = 2**30


@pytest.mark.parametrize("max_num_seqs,expected", [
    (1, (1,)), (3, (1, 2, 4)), (8, (1, 2, 4, 8)), (12, (1, 2, 4, 8, 16)),
    (64, (1, 2, 4) + tuple(range(8, 65, 8))), (1000, (1, 2, 4) + tuple(range(8, 257, 8)))])
def test_default_capture_sizes_reach_max_num_seqs(max_num_seqs: int,
                                                  expected: tuple[int, ...]) -> None:
    assert default_capture_sizes(max_num_seqs) == expected


def test_bucket_size_is_the_smallest_that_holds_the_batch() -> None:
    sizes = (1, 2, 4, 8, 16)
    assert [bucket_size(sizes, n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8,
                                                                            16, 16]
    assert bucket_size(sizes, 17) is None


@pytest.mark.parametrize("as_given", [
    lambda x: x,                                                    # lists
    lambda x: np.array(x, dtype=np.int32 if isinstance(x[0], list) else np.int64)],  # runner's
    ids=["lists", "arrays"])
def test_decode_inputs_pad_rows_up_to_the_bucket(as_given: Callable[[list], object]) -> None:
    inputs = DecodeInputs(max_size=8, max_blocks_per_seq=6, device=CPU)
    inputs.load(*map(as_given, ([11, 12, 13, 14, 15], [3, 30, 17, 0, 5], [3, 94, 33, 80, 21],
                                [4, 31, 18, 1, 6], [[0, 0], [7, 5], [2, 0], [5, 0], [1, 0]])),
                size=8)
    # A smaller step next: its rows come first, the rest of its bucket is padding.
    inputs.load(*map(as_given, ([21, 22, 23], [4, 31, 18], [4, 95, 34], [5, 32, 19],
                                [[9, 0], [7, 5], [2, 3]])), size=4)
    assert inputs.tokens[:, :4].tolist() == [[21, 22, 23, 0], [4, 31, 18, 0], [4, 95, 34, -1]]
    assert inputs.seq_lens[:4].tolist() == [5, 32, 19, 1]
    assert inputs.block_tables[:3, :2].tolist() == [[9, 0], [7, 5], [2, 3]]
    assert inputs.block_tables[3, 0] == 0               # the padding row reads block 0
    meta = inputs.metadata(4, BLOCK_SIZE, max_model_len=96, num_splits=3)
    assert meta.slot_mapping.data_ptr() == inputs.tokens[2].data_ptr()
    assert meta.block_tables.data_ptr() == inputs.block_tables.data_ptr()
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables.shape == (4, 6) and meta.seq_lens.shape == (4,)
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs,
            meta.decode_num_splits) == (1, 96, 4, 3)


def _triton_model() -> LlamaForCausalLM:
    """ARCH with the Triton kernels on the CPU (run by the interpreter)."""
    from taskloom.ops.backend import triton_ops
    with torch.device("meta"):
        model = LlamaForCausalLM(ARCH, triton_ops())
    materialize(model, torch.float32, CPU)
    init_random_weights(model.eval(), seed=0)
    return model


@torch.inference_mode()
@pytest.mark.parametrize("tree", [False, True], ids=["plain", "captured-with-trees"])
def test_padded_static_decode_step_matches_the_eager_step(tree: bool) -> None:
    """The forward a graph captures (static buffers, padding rows, a fixed split count from
    max_model_len, block tables as wide as max_model_len) gives the eager step's hidden
    states and writes the same keys and values, and nothing for the padding rows; also when
    captured for token trees, with a step of none."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    from taskloom.ops.triton.decode_attention import decode_num_splits
    if torch.cuda.is_available() or not isinstance(triton.language.cdiv, InterpretedFunction):
        pytest.skip("needs the Triton interpreter (no CUDA, TRITON_INTERPRET=1 set by "
                    "tests/conftest.py before triton is imported)")
    model, max_model_len = _triton_model(), 2048
    prompts = [list(range(3, 3 + n)) for n in (5, 20, 37)]
    tables = [[9, 4], [0, 7], [2, 5, 8]]
    caches = new_kv_caches(ARCH, 12, BLOCK_SIZE, torch.float32, CPU)
    meta, positions = make_metadata(tables, [0, 0, 0], [len(p) for p in prompts], BLOCK_SIZE,
                                    CPU)
    model(torch.tensor([t for p in prompts for t in p]), positions, caches, meta)
    before = [c.clone() for c in caches]
    meta, positions = make_metadata(tables, [5, 20, 37], [1, 1, 1], BLOCK_SIZE, CPU)
    eager_hidden = model(torch.tensor([7, 8, 9]), positions, caches, meta)  # [3, hidden]

    inputs = DecodeInputs(8, max_model_len // BLOCK_SIZE, CPU)
    width = max(map(len, tables))
    inputs.load([7, 8, 9], positions.tolist(), meta.slot_mapping.tolist(), [6, 21, 38],
                [t + [0] * (width - len(t)) for t in tables], size=4)
    if tree:
        inputs.load_tree(None, [6, 21, 38])
    splits = decode_num_splits(4, ARCH.num_key_value_heads, max_model_len)
    assert splits > 1
    static_caches = [c.clone() for c in before]
    static_hidden = model(inputs.tokens[0, :4], inputs.tokens[1, :4], static_caches,
                          inputs.metadata(4, BLOCK_SIZE, max_model_len, splits, tree=tree))
    torch.testing.assert_close(static_hidden[:3], eager_hidden, atol=1e-5, rtol=1e-5)
    written = torch.zeros(12 * BLOCK_SIZE, dtype=torch.bool)
    written[meta.slot_mapping] = True
    for ours, eager, old in zip(static_caches, caches, before):
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
        untouched = ~written.view(12, BLOCK_SIZE)
        assert torch.equal(ours[:, untouched], old[:, untouched])


def test_decode_inputs_stage_token_tree_rows() -> None:
    inputs = DecodeInputs(max_size=8, max_blocks_per_seq=2, device=CPU)
    inputs.load_tree(None, [5, 9])          # no tree: each row sees its whole context
    assert inputs.tree_lo.tolist() == [5, 9] + [1] * 6 and not inputs.tree[1].any()
    inputs.load_tree(np.array([[3, 3, 7], [0b1, 0b11, 0]]), [4, 5, 7])
    assert inputs.tree_lo.tolist() == [3, 3, 7] + [1] * 5
    assert inputs.tree[1].tolist() == [1, 3] + [0] * 6
    meta = inputs.metadata(4, BLOCK_SIZE, 64, 2, tree=True)
    assert meta.decode_tree_lo is not None and meta.decode_tree_lo.tolist() == [3, 3, 7, 1]
    assert inputs.metadata(4, BLOCK_SIZE, 64, 2).decode_tree_lo is None


def test_kv_cache_bytes_leave_the_profiled_peak_and_graph_reserve() -> None:
    profile = MemoryProfile(total=80 * GIB, baseline=16 * GIB, peak=18 * GIB,
                            non_torch=GIB // 2, num_tokens=2048)
    no_graphs = kv_cache_bytes(profile, 0.9, ())
    assert no_graphs == int(0.9 * 80 * GIB) - 18 * GIB - GIB // 2
    # The reserve: activations (2 GiB for 2048 tokens) scaled to 256 tokens, plus per graph.
    assert kv_cache_bytes(profile, 0.9, (1, 2, 256)) == (
        no_graphs - 2 * GIB * 256 // 2048 - 3 * GRAPH_OVERHEAD_BYTES)
    with pytest.raises(ValueError, match="no GPU memory is left for the KV cache: "
                                         "gpu_memory_utilization 0.2 of 80.00 GiB"):
        kv_cache_bytes(profile, 0.2, (1, 2))


def test_profiling_step_runs_the_largest_step_and_the_sampler() -> None:
    """The profiling step's batch and sampler call, run on the CPU reference path."""
    assert _profile_seq_lens(2048, 4096) == [2048]
    assert _profile_seq_lens(2048, 1000) == [1000, 1000, 48]
    assert _profile_seq_lens(2000, 1000) == [1000, 1000]
    model = build_model(ARCH, torch.float32, CPU)
    init_random_weights(model, seed=0)
    with torch.inference_mode():
        hidden = _profile_forward(model, ARCH, _profile_seq_lens(80, 48), BLOCK_SIZE, CPU)
        assert hidden.shape == (80, ARCH.hidden_size) and bool(hidden.isfinite().all())
        _profile_sampler(model, ARCH.vocab_size, hidden[:5])


def test_graphs_are_off_on_the_cpu_and_configurable(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ARCH_HF))
    llm = LLM(str(config), random_weights=True, num_blocks=8, cuda_graph_sizes=[4, 1])
    assert llm.engine.runner.graphs is None
    assert llm.config.model.cuda_graph_sizes == (4, 1)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        ModelRunner(llm.engine.runner.model, ARCH, 4, BLOCK_SIZE, torch.float32, CPU, (),
                    max_model_len=64, graph_sizes=(1, 2))
    for bad in ((), (0, 2)):
        with pytest.raises(ValueError, match="cuda_graph_sizes must be a non-empty list"):
            ModelConfig(cuda_graph_sizes=bad)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--enforce-eager"]).enforce_eager
    assert not parser.parse_args([]).enforce_eager


def test_decode_inputs_stage_lora_slots_as_one_segment_per_row() -> None:
    inputs = DecodeInputs(max_size=8, max_blocks_per_seq=2, device=CPU)
    inputs.load_lora_slots([3, -1, 0])
    meta = inputs.lora_metadata(4)
    assert meta.token_slots.data_ptr() == inputs.lora_slots.data_ptr()
    assert meta.token_slots.tolist() == [3, -1, 0, -1]             # padding rows: no adapter
    assert meta.seg_starts.tolist() == [0, 1, 2, 3, 4] and meta.max_seg_len == 1
    assert meta.has_adapters                # captured with the LoRA ops, whatever the step


@torch.inference_mode()
def test_padded_static_lora_decode_step_matches_the_eager_step() -> None:
    """With LoRA projections (Triton kernels through the interpreter), the static decode
    forward a graph captures, each row's slot read from the static buffer, gives the eager
    step's hidden states for a batch mixing two adapters and the base model."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    from taskloom.lora.adapter import LoRAAdapter, LoRAWeights, target_shapes
    from taskloom.lora.layers import LoRAState, wrap_projections
    from taskloom.lora.metadata import build_lora_metadata
    from taskloom.ops.backend import triton_ops
    if torch.cuda.is_available() or not isinstance(triton.language.cdiv, InterpretedFunction):
        pytest.skip("needs the Triton interpreter (no CUDA, TRITON_INTERPRET=1 set by "
                    "tests/conftest.py before triton is imported)")
    model, state = _triton_model(), LoRAState()
    layers = wrap_projections(model, 2, 4, triton_ops(), state)
    gen = torch.Generator().manual_seed(3)
    for slot in range(2):
        weights = {(i, m): LoRAWeights(0.3 * torch.randn(4, fin, generator=gen),
                                       0.3 * torch.randn(fout, 4, generator=gen))
                   for i in range(ARCH.num_hidden_layers)
                   for m, (fin, fout) in target_shapes(ARCH).items()}
        for layer in layers:
            layer.set_slot(slot, LoRAAdapter(f"a{slot}", 4, 2.0, weights))
    tables = [[9, 4], [0, 7], [2, 5, 8]]
    caches = new_kv_caches(ARCH, 12, BLOCK_SIZE, torch.float32, CPU)
    meta, positions = make_metadata(tables, [5, 20, 37], [1, 1, 1], BLOCK_SIZE, CPU)
    state.meta = build_lora_metadata([1, -1, 0], CPU)
    eager = model(torch.tensor([7, 8, 9]), positions, [c.clone() for c in caches], meta)
    state.meta = None
    base = model(torch.tensor([7, 8, 9]), positions, [c.clone() for c in caches], meta)
    assert torch.equal(eager[1], base[1]) and not torch.allclose(eager[0], base[0])

    inputs = DecodeInputs(8, 2048 // BLOCK_SIZE, CPU)
    width = max(map(len, tables))
    inputs.load([7, 8, 9], positions.tolist(), meta.slot_mapping.tolist(), [6, 21, 38],
                [t + [0] * (width - len(t)) for t in tables], size=4)
    inputs.load_lora_slots([1, -1, 0])
    state.meta = inputs.lora_metadata(4)
    static = model(inputs.tokens[0, :4], inputs.tokens[1, :4], [c.clone() for c in caches],
                   inputs.metadata(4, BLOCK_SIZE, 2048, 2))
    torch.testing.assert_close(static[:3], eager, atol=1e-5, rtol=1e-5)
