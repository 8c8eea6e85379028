"""LoRA adapters against HF transformers + PEFT in float32 on the CPU.

The adapters are made here by `peft` itself (random A and B: `init_lora_weights=False`), with
different ranks, alphas, rsLoRA and target modules, saved with `save_pretrained` and loaded by
taskloom from those directories. On a random tiny Llama and on the embedded SmolLM2, greedy
continuations with each adapter equal PEFT's, and a batch mixing every adapter and the base
model gives each request what it gets alone.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
import transformers

from taskloom import LLM, SamplingParams
from tests.e2e.conftest import assert_pool_full
from tests.models.hf_smollm import load_hf_smollm
from tests.models.tiny_models import build_tiny_hf, random_prompts

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig arguments: ranks, alphas, rsLoRA and target sets all differ.
ADAPTERS = {
    "attn-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-r16-rs": dict(r=16, lora_alpha=4, use_rslora=True,
                       target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all-r4": dict(r=4, lora_alpha=4, target_modules=ALL),
    "qv-r2": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
# Eight for the tiny model: each of the above twice, initialised differently.
TINY_ADAPTERS = {**ADAPTERS, **{f"{name}-b": kw for name, kw in ADAPTERS.items()}}


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    peft_model: peft.PeftModel
    llm: LLM
    prompts: list[list[int]]


def make_adapters(hf: transformers.PreTrainedModel, adapters: dict[str, dict],
                  directory: Path, scale: float) -> peft.PeftModel:
    """Every adapter of `adapters` on `hf`, randomly initialised (B scaled by `scale` so the
    updates are large enough to change greedy tokens but not drown the base model), saved
    under directory/<name>."""
    model = None
    for i, (name, kwargs) in enumerate(adapters.items()):
        torch.manual_seed(100 + i)
        config = peft.LoraConfig(init_lora_weights=False, **kwargs)
        if model is None:
            model = peft.get_peft_model(hf, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_B:
                    module.lora_B[name].weight.mul_(scale)
    assert model is not None
    model.save_pretrained(directory)
    return model.eval()


def adapter_dir(directory: Path, name: str) -> str:
    # PEFT saves the first adapter (named by get_peft_model) in a subfolder too when its name
    # is not "default".
    return str(directory / name)


@torch.no_grad()
def peft_greedy(model: peft.PeftModel, adapter: str | None, prompt: list[int], n: int
                ) -> list[int]:
    ids = torch.tensor([prompt])
    if adapter is None:
        with model.disable_adapter():
            out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    else:
        model.set_adapter(adapter)
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=n,
                             min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    root = tmp_path_factory.mktemp("tiny-lora")
    hf = build_tiny_hf("llama-llama3-gqa", seed=5)
    hf.save_pretrained(root / "base", safe_serialization=True)
    model = make_adapters(hf, TINY_ADAPTERS, root / "adapters", scale=1.0)
    # Two device slots and three host copies for eight adapters: slots are overwritten and
    # adapters reloaded from disk all the time.
    llm = LLM(str(root / "base"), skip_tokenizer_init=True, num_blocks=64, block_size=8,
              loras={n: adapter_dir(root / "adapters", n) for n in TINY_ADAPTERS},
              max_loras=2, max_cpu_loras=3)
    yield Case(model, llm, random_prompts(256, seed=11))
    assert_pool_full(llm)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    root = tmp_path_factory.mktemp("smol-lora")
    model = make_adapters(load_hf_smollm(), ADAPTERS, root, scale=0.05)
    llm = LLM(kv_cache_memory_gb=0.05, max_loras=2,
              loras={n: adapter_dir(root, n) for n in ADAPTERS})
    prompts = [llm.tokenizer.encode(t) for t in ("The capital of France is",
                                                 "def add(a, b):\n    return")]
    yield Case(model, llm, prompts)
    assert_pool_full(llm)


GREEDY = dict(temperature=0.0, ignore_eos=True)


def check_greedy_matches_peft(case: Case, adapter: str | None, n: int) -> None:
    """taskloom's greedy continuations of every prompt, all in one batch with `adapter`,
    equal PEFT's, each prompt alone."""
    outs = case.llm.generate(case.prompts, SamplingParams(max_tokens=n, **GREEDY),
                             use_tqdm=False, lora=adapter)
    for i, (prompt, out) in enumerate(zip(case.prompts, outs)):
        assert out.outputs[0].token_ids == peft_greedy(case.peft_model, adapter, prompt, n), \
            f"prompt {i}, adapter {adapter}"


@pytest.mark.parametrize("adapter", [None, *TINY_ADAPTERS])
def test_tiny_greedy_matches_peft(tiny: Case, adapter: str | None) -> None:
    check_greedy_matches_peft(tiny, adapter, 24)


def test_tiny_adapters_change_the_output(tiny: Case) -> None:
    """Guards the test above: each adapter really moves the model somewhere else."""
    params = SamplingParams(max_tokens=16, **GREEDY)
    outs = {a: [o.outputs[0].token_ids for o in tiny.llm.generate(
        tiny.prompts, params, use_tqdm=False, lora=a)] for a in [None, *TINY_ADAPTERS]}
    assert len({tuple(map(tuple, v)) for v in outs.values()}) == len(outs)


def test_tiny_mixed_batch_equals_each_alone(tiny: Case) -> None:
    """Every prompt with each of 8 adapters and the base, in one batch through 2 slots, equals
    each request run alone; every request finishes (none starves)."""
    manager = tiny.llm.engine.runner.lora
    loads, writes = manager.num_loads, manager.num_slot_writes
    params = SamplingParams(max_tokens=12, **GREEDY)
    kinds = [None, *TINY_ADAPTERS]
    prompts = [p for p in tiny.prompts for _ in kinds]
    loras = [k for _ in tiny.prompts for k in kinds]
    mixed = tiny.llm.generate(prompts, params, use_tqdm=False, lora=loras)
    assert all(o.finished and len(o.outputs[0].token_ids) == 12 for o in mixed)
    assert manager.num_slot_writes - writes >= 8 and manager.num_loads - loads >= 5
    for prompt, lora, out in zip(prompts, loras, mixed):
        alone = tiny.llm.generate([prompt], params, use_tqdm=False, lora=lora)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, f"adapter {lora}"


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, "attn-r8", "mlp-r16-rs", "all-r4"])
def test_smollm2_greedy_matches_peft(smol: Case, adapter: str | None) -> None:
    check_greedy_matches_peft(smol, adapter, 16)

