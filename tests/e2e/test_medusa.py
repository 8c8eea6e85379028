"""Medusa drafts end to end. With the embedded model and random heads, the outputs are those
of the engine without drafts, token for token (greedy, seeded, logprobs, stops, n > 1), in one
mixed batch, with drafts proposed and some accepted. On a tiny random-weight Llama, heads
trained by `train-medusa` (self-distillation) are accepted far more often than the untrained
heads they start from. Every engine ends with its pool full."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from taskloom import LLM
from taskloom.cli import main as cli_main
from taskloom.models.medusa import MedusaConfig, MedusaHeads, save_medusa
from taskloom.sampling_params import SamplingParams
from tests.e2e.conftest import assert_pool_full
from tests.models.tiny_models import TINY_LLAMA_CONFIG as TINY
from tests.models.tiny_models import write_tiny_config

CHAT = [{"role": "user", "content": "Explain what a Python list comprehension is."}]
LIST = [{"role": "user", "content": "List the days of the week, one per line."}]
CASES = [
    (CHAT, SamplingParams(max_tokens=48, temperature=0)),
    (LIST, SamplingParams(max_tokens=40, temperature=0.8, seed=1)),
    (CHAT, SamplingParams(max_tokens=32, temperature=0.7, seed=2, repetition_penalty=1.1,
                          n=2)),
    (LIST, SamplingParams(max_tokens=40, temperature=0, stop=["Thursday"])),
    (CHAT, SamplingParams(max_tokens=16, temperature=0, logprobs=2)),
]


@pytest.fixture(scope="module")
def random_heads(tmp_path_factory: pytest.TempPathFactory, llm: LLM) -> str:
    """Three heads over the embedded model with small random blocks and its own lm head."""
    arch = llm.engine.runner.model.config
    cfg = MedusaConfig(3, 1, arch.hidden_size, arch.vocab_size, bias=True, num_lm_heads=0)
    heads = MedusaHeads(cfg, torch.zeros(0), torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=g) * 0.02)
        heads.bias.copy_(torch.randn(heads.bias.shape, generator=g) * 0.02)
    path = tmp_path_factory.mktemp("medusa")
    save_medusa(heads, str(path))
    return str(path)


@pytest.fixture(scope="module")
def medusa_llm(random_heads: str) -> Iterator[LLM]:
    engine = LLM(max_num_seqs=16, kv_cache_memory_gb=0.25, speculative_config={
        "method": "medusa", "model": random_heads, "num_speculative_tokens": 3})
    yield engine
    assert_pool_full(engine)


def completions(llm: LLM) -> list[list[tuple]]:
    """Each completion's tokens, text, finish reason, and per token its logprobs' token ids
    and ranks (their values are compared apart, to float tolerance)."""
    outs = llm.chat([c for c, _ in CASES], [p for _, p in CASES], use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason,
              [[(t, v.rank) for t, v in lp.items()] for lp in c.logprobs or []])
             for c in o.outputs] for o in outs]


def logprob_values(llm: LLM) -> list[float]:
    (out,) = llm.chat([CASES[4][0]], [CASES[4][1]], use_tqdm=False)
    return [v.logprob for lp in out.outputs[0].logprobs for v in lp.values()]


def test_outputs_are_those_without_drafts(llm: LLM, medusa_llm: LLM) -> None:
    stats = medusa_llm.engine.scheduler.spec_stats
    assert completions(medusa_llm) == completions(llm)
    assert stats.num_drafts > 20 and stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens
    assert logprob_values(medusa_llm) == pytest.approx(logprob_values(llm), abs=1e-4)


def test_bench_spec_runs_medusa_on_the_held_out_topics(random_heads: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["bench", "spec", "--workload", "topics", "--batch-sizes", "2",
                     "--output-len", "8", "--repeats", "1", "--kv-cache-memory-gb", "0.1",
                     "--speculative-config", json.dumps({
                         "method": "medusa", "model": random_heads,
                         "num_speculative_tokens": 2})]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["workload"] == "builtin:topics-eval"
    assert result["speculative_config"]["method"] == "medusa"
    (row,) = result["results"]
    assert row["outputs_identical"] and row["spec"]["draft_tokens"] > 0


def test_more_drafts_than_heads_are_refused(random_heads: str) -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens 4 is more than the 3 heads"):
        LLM(speculative_config={"method": "medusa", "model": random_heads,
                                "num_speculative_tokens": 4})


def _acceptance(config: str, heads: str, prompts: list[list[int]]) -> float:
    llm = LLM(config, random_weights=True, max_num_seqs=8, num_blocks=64,
              speculative_config={"method": "medusa", "model": heads,
                                  "num_speculative_tokens": 3})
    llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    assert_pool_full(llm)
    return llm.engine.scheduler.spec_stats.acceptance_rate


def test_trained_heads_are_accepted_more_than_untrained_ones(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture
                                                            ) -> None:
    config = write_tiny_config(tmp_path)
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(12)] for i in range(16)]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "heads"
    cli_main(["train-medusa", "--model", config, "--random-weights", "--output", str(out),
              "--prompts-file", str(tmp_path / "prompts.jsonl"), "--num-heads", "3",
              "--num-layers", "2", "--max-tokens", "48", "--epochs", "40", "--lr", "1e-2",
              "--batch-tokens", "32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_positions"] == 16 * 47 and result["output"] == str(out)
    first, last = result["epochs"][0]["top1"], result["epochs"][-1]["top1"]
    assert all(b > a for a, b in zip(first, last))
    # the untrained heads they start from: zero blocks, the base's next-token guess
    untrained = tmp_path / "untrained"
    save_medusa(MedusaHeads(MedusaConfig(3, 2, TINY["hidden_size"], TINY["vocab_size"]),
                            torch.zeros(0), torch.float32, torch.device("cpu")), str(untrained))
    trained_rate = _acceptance(config, str(out), prompts)
    assert trained_rate > 0.3
    assert trained_rate > 10 * _acceptance(config, str(untrained), prompts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_medusa_on_cuda_with_graphs_gives_the_outputs_without_drafts(tmp_path: Path) -> None:
    """Triton kernels, decode steps with drafts replaying CUDA graphs, the heads' guesses
    found on the device; a tiny random Llama in fp32, greedy and seeded."""
    config = write_tiny_config(tmp_path)
    heads = tmp_path / "heads"
    arch = LLM(config, random_weights=True, num_blocks=4).engine.runner.model.config
    random = MedusaHeads(MedusaConfig(3, 1, arch.hidden_size, arch.vocab_size),
                         torch.zeros(0), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        random.weight.normal_(0, 0.05)
    save_medusa(random, str(heads))
    prompts = [[(5 * i + j) % 1000 + 1 for j in range(10 + i)] for i in range(6)]
    params = [SamplingParams(max_tokens=32, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=32, temperature=0.8, seed=3, ignore_eos=True)] * 3
    outputs = []
    for spec in (None, {"method": "medusa", "model": str(heads), "num_speculative_tokens": 3}):
        llm = LLM(config, random_weights=True, device="cuda", num_blocks=64,
                  speculative_config=spec)
        assert llm.engine.runner.graphs is not None
        outputs.append([o.outputs[0].token_ids
                        for o in llm.generate(prompts, params, use_tqdm=False)])
        assert_pool_full(llm)
    assert outputs[0] == outputs[1]
    assert llm.engine.scheduler.spec_stats.num_drafts > 0
