"""CPU decode graphs (`taskloom.runtime.cpu_graphs`): decode steps of the embedded model (4-bit
and bf16) replayed from their recorded C kernel calls and torch operators give the tokens the
eager forward gives, at every batch size a run passes through; a forward a replay cannot
repeat is refused and runs eagerly; the recordings kept are the most recently used."""
from __future__ import annotations

import pytest
import torch

from taskloom import LLM, SamplingParams
from taskloom.ops.cpu_kernels import record_kernel_calls
from taskloom.ops.int4_vnni import library
from taskloom.runtime import cpu_graphs
from taskloom.runtime.cpu_graphs import _Audit, _AtenCall
from tests.e2e.conftest import assert_pool_full
from tests.models.tiny_models import TINY_CASES, build_tiny_hf, random_prompts

needs_vnni = pytest.mark.skipif(library() is None,
                                reason="4-bit projections by C kernels need AVX-512 VNNI")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there",
           "Water boils at", "My favourite colour is", "In 1492, Columbus"]


def _run(eager: bool, prompts: list[str] = PROMPTS, num_blocks: int = 256, tokens: int = 6,
         **kw) -> tuple[LLM, list[list[int]]]:
    llm = LLM(dtype="bfloat16", num_blocks=num_blocks, enforce_eager=eager, **kw)
    # different lengths: the batch shrinks one sequence at a time, each size a decode step
    params = [SamplingParams(temperature=0.0, max_tokens=tokens + 3 * i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@needs_vnni
def test_4bit_decode_steps_replay_and_give_the_eager_tokens() -> None:
    eager, want = _run(True, quantization="gguf")
    assert eager.engine.runner.cpu_graphs is None
    llm, got = _run(False, quantization="gguf")
    graphs = llm.engine.runner.cpu_graphs
    assert graphs is not None and graphs.refused is None
    assert got == want                  # the same kernels on the same inputs: the same bits
    assert sorted(graphs.recordings) == [1, 2, 3, 4, 5, 6]
    assert graphs.replays > 0
    rec = graphs.recordings[1]
    assert len(rec.calls) > 4 * llm.engine.runner.arch.num_hidden_layers
    assert_pool_full(llm)
    assert_pool_full(eager)


@needs_vnni
def test_async_steps_placeholders_and_evicted_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    _, want = _run(True, quantization="gguf")
    monkeypatch.setattr(cpu_graphs, "MAX_GRAPHS", 2)
    llm, got = _run(False, quantization="gguf", async_scheduling=True)
    graphs = llm.engine.runner.cpu_graphs
    assert got == want and graphs.replays > 0
    assert len(graphs.recordings) == 2 and list(graphs.recordings) == [2, 1]   # LRU order
    assert_pool_full(llm)
    # within a byte budget: here one recording's worth, so only the newest stays
    monkeypatch.setattr(cpu_graphs, "MAX_GRAPHS", 8)
    monkeypatch.setattr(cpu_graphs, "MAX_GRAPH_BYTES", graphs.recordings[2].nbytes)
    llm, got = _run(False, quantization="gguf")
    graphs = llm.engine.runner.cpu_graphs
    assert got == want and list(graphs.recordings) == [1]
    assert graphs.nbytes == graphs.recordings[1].nbytes > 0
    assert_pool_full(llm)


@needs_vnni
def test_decodes_sharing_a_prefix_run_eagerly_and_agree() -> None:
    shared = "You are a helpful assistant. Answer briefly and politely. " * 4
    prompts = [shared + q for q in ("What is 2 + 2?", "Name a colour.", "Say hello.")]
    _, want = _run(True, prompts, quantization="gguf")
    llm, got = _run(False, prompts, quantization="gguf")
    assert got == want
    assert_pool_full(llm)


def test_bf16_steps_replay_their_onednn_gemms_and_give_the_eager_tokens() -> None:
    # bf16 projections are oneDNN GEMMs (or torch's): recorded as torch operators, repeated
    # into the tensors they first made
    _, want = _run(True)
    llm, got = _run(False)
    graphs = llm.engine.runner.cpu_graphs
    assert got == want
    assert graphs is not None and graphs.refused is None and graphs.replays > 0
    calls = graphs.recordings[1].calls
    assert any(isinstance(fn, _AtenCall) for fn, _ in calls)
    assert sum(getattr(fn, "__name__", "") == "decode_attention_bf16" for fn, _ in calls) == \
        llm.engine.runner.arch.num_hidden_layers
    assert_pool_full(llm)


@torch.inference_mode()      # as the runner records (reshape then dispatches whole)
def test_the_audit_keeps_allocations_repeats_operators_and_names_the_unrepeatable() -> None:
    calls: list = []
    audit = _Audit(calls)
    with audit:
        x = torch.empty(4, 6)
        x.fill_(1.0)                          # in place: repeated on x itself
        x.view(6, 4).t().reshape(4, 6)        # views
        c = x[:, :3].reshape(12)              # not viewable: a copy, repeated into c
        y = x + 1
        y.sum().item()                        # to the host: a replay cannot repeat it
    assert len(audit.kept) == 4 and audit.kept[0].data_ptr() == x.data_ptr()   # x, c, y, sum
    assert audit.repeated == ["aten.fill_", "aten.reshape", "aten.add", "aten.sum"]
    assert audit.foreign == ["aten.item"]
    # a replay repeats each into what it first made
    x.zero_()
    for fn, args in calls:
        fn(*args)
    assert (x == 1).all() and (c == 1).all() and (y == 2).all()


def test_a_replayed_operator_must_give_what_it_recorded() -> None:
    a = torch.ones(3)
    out = a + 1
    call = _AtenCall(torch.ops.aten.add.Tensor, (a, 1), {}, out)
    a.fill_(2)
    call()
    assert (out == 3).all()
    bad = _AtenCall(torch.ops.aten.add.Tensor, (torch.ones(4), 1), {}, out)
    with pytest.raises(RuntimeError, match=r"gave \(4,\) where it was recorded with \(3,\)"):
        bad()


class _Decoder(torch.nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 4)
        self._forward = forward

    def forward_embedded(self, hidden, positions, kv_caches, meta):
        return self._forward(hidden)


class _Model(torch.nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self.model = _Decoder(forward)


def test_a_forward_that_reads_to_the_host_is_refused() -> None:
    def forward(hidden):
        if (hidden.sum() > 1e9).item():       # a decision on the step's values
            return hidden
        return hidden * 2
    graphs = cpu_graphs.CpuDecodeGraphs(_Model(forward), [], block_size=4, max_model_len=8)
    assert graphs.run(torch.tensor([3]), [0], [0], [1], [[0]]) is None
    assert graphs.refused == "aten.item"
    assert not graphs.fits(1) and not graphs.recordings
    with pytest.raises(ValueError, match="does not replay here.*refused"):
        graphs.run(torch.zeros(1, dtype=torch.int64), [0], [0], [1], [[0]])


def test_a_torch_path_failing_on_the_recordings_metadata_is_a_refusal() -> None:
    def forward(hidden):                      # a torch path, then what a missing mask raises
        hidden + 1
        raise TypeError("mask is None")
    graphs = cpu_graphs.CpuDecodeGraphs(_Model(forward), [], block_size=4, max_model_len=8)
    assert graphs.run(torch.tensor([3]), [0], [0], [1], [[0]]) is None
    assert graphs.refused == "TypeError in aten.add"
    assert not graphs.fits(1) and not graphs.recordings


def test_recordings_do_not_nest() -> None:
    with record_kernel_calls() as calls:
        assert calls == []
        with pytest.raises(RuntimeError, match="already being recorded"):
            with record_kernel_calls():
                pass


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_every_architecture_replays_and_gives_the_eager_tokens(tmp_path, case: str) -> None:
    # biases (in oneDNN's GEMMs) and Qwen3's q/k norms (torch's, over strided views) are
    # torch operators in a recording, replayed
    hf = build_tiny_hf(case)
    hf.save_pretrained(tmp_path)
    prompts = random_prompts(hf.config.vocab_size, seed=3)[:4]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True)
              for i in range(len(prompts))]
    outs = []
    for eager in (True, False):
        llm = LLM(str(tmp_path), dtype="bfloat16", num_blocks=64, enforce_eager=eager,
                  skip_tokenizer_init=True)
        outs.append([o.outputs[0].token_ids for o in
                     llm.generate(prompts, params,
                                  use_tqdm=False)])
        assert_pool_full(llm)
    graphs = llm.engine.runner.cpu_graphs
    assert outs[0] == outs[1]
    assert graphs is not None and graphs.refused is None and graphs.replays > 0


@needs_vnni
def test_preempted_and_recomputed_sequences_replay_the_eager_tokens() -> None:
    # a pool of 6 blocks of 16 tokens for six sequences growing to 25-48 tokens: the
    # scheduler preempts, recomputes, and the decode batch changes size as it does (against
    # eager steps preempted alike: a recomputed prompt's KV comes from a prefill, which in
    # bf16 need not round as the decodes did)
    eager, want = _run(True, quantization="gguf", num_blocks=6, tokens=20)
    llm, got = _run(False, quantization="gguf", num_blocks=6, tokens=20)
    assert eager.engine.scheduler.num_preemptions == llm.engine.scheduler.num_preemptions
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == want and llm.engine.runner.cpu_graphs.replays > 0
    assert_pool_full(llm)
