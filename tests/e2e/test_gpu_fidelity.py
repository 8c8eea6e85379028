"""The engine on a CUDA device (Triton kernels) against HF transformers on the same device:
greedy continuations identical in float32 for a tiny random model of every architecture, and
the agreement rate in bfloat16 over 50 prompts x 64 tokens (printed, and bounded below).

The embedded SmolLM2 file (98 MB) cannot travel to the GPU machine, so the models here are the
tiny random configs of tests/models, whose norms and biases are perturbed so that their
next-token distributions are far from flat."""
from __future__ import annotations

import json
import os

import pytest
import torch

from taskloom import LLM, SamplingParams
from tests.models.tiny_models import TINY_CASES, build_tiny_hf, random_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEW_TOKENS = 48


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[str, str]:
    case = request.param
    path = str(tmp_path_factory.mktemp(case))
    build_tiny_hf(case).save_pretrained(path, safe_serialization=True)
    return case, path


def _hf_greedy(path: str, prompts: list[list[int]], dtype: torch.dtype, new: int
               ) -> list[list[int]]:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    del hf
    torch.cuda.empty_cache()
    return outs


def _ours(path: str, prompts: list[list[int]], dtype: str, new: int,
          speculative_config: dict | None = None) -> list[list[int]]:
    llm = LLM(path, device="cuda", dtype=dtype, skip_tokenizer_init=True, num_blocks=256,
              max_model_len=256, speculative_config=speculative_config)
    graphs = llm.engine.runner.graphs
    replays: list[int] = []
    if graphs is not None:
        run = graphs.run
        graphs.run = lambda *args: replays.append(len(args[3])) or run(*args)  # seq_lens
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True),
                        use_tqdm=False)
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
    if speculative_config is not None:
        assert llm.engine.scheduler.spec_stats.num_accepted_tokens > 0
        # steps of decodes with drafts replayed graphs of one row per token
        assert replays and max(replays) > len(prompts), replays
    return [o.outputs[0].token_ids for o in outs]


def test_fp32_greedy_identical_to_hf(tiny_dir: tuple[str, str]) -> None:
    case, path = tiny_dir
    prompts = random_prompts(256, seed=1)
    assert _ours(path, prompts, "float32", NEW_TOKENS) == \
        _hf_greedy(path, prompts, torch.float32, NEW_TOKENS), case


def test_fp32_greedy_with_speculative_decoding_identical_to_hf(tmp_path: os.PathLike) -> None:
    """Prompt-lookup drafts on the GPU: a step of decodes with drafts replays a CUDA graph
    of one row per token (steps with prefill chunks run eagerly, the drafted sequences
    through the Triton extend attention), and the tokens are HF's. The prompts repeat
    themselves, so drafts are found and accepted."""
    path = str(tmp_path)
    build_tiny_hf("llama-llama3-gqa").save_pretrained(path, safe_serialization=True)
    prompts = [p + p for p in random_prompts(256, seed=2)]
    assert _ours(path, prompts, "float32", NEW_TOKENS, {"num_speculative_tokens": 4}) == \
        _hf_greedy(path, prompts, torch.float32, NEW_TOKENS)


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of sequences identical, mean fraction of tokens before the first difference)"""
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        prefix.append(n / len(x))
    return sum(p == 1.0 for p in prefix) / len(prefix), sum(prefix) / len(prefix)


def test_bf16_agreement_with_hf(tmp_path: os.PathLike) -> None:
    path = str(tmp_path)
    build_tiny_hf("llama-llama3-gqa").save_pretrained(path, safe_serialization=True)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 120, (50,), generator=gen)]
    ours = _ours(path, prompts, "bfloat16", 64)
    theirs = _hf_greedy(path, prompts, torch.bfloat16, 64)
    identical, prefix = _agreement(ours, theirs)
    report = {"bf16_sequences_identical": identical, "bf16_mean_agreeing_prefix": prefix,
              "prompts": len(prompts), "new_tokens": 64}
    print("GPU-FIDELITY " + json.dumps(report))
    assert prefix >= 0.5, report
