"""An adapter that can no longer be loaded fails its own requests, with a message that names it,
and nothing else: the other requests of the batch are served as if alone, no device slot or KV
block is lost, and the adapter serves again once its files are back.

Adapters are checked when they are loaded; a failure can only come later, when an adapter
dropped from the host cache (`max_cpu_loras`) is read again from a directory that has since
been deleted or damaged. One device slot and one host copy force exactly that here.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskloom import LLM, SamplingParams
from taskloom.lora.random_adapter import write_random_adapter
from taskloom.models.loader import random_arch
from tests.e2e.conftest import assert_pool_full
from tests.models.tiny_models import write_tiny_config

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SHARED = list(range(10, 22))     # three full blocks of 4 that every prompt starts with
PROMPTS = [SHARED + [30 + i, 40 + i] for i in range(4)]


@dataclass
class Case:
    llm: LLM
    oracle: LLM            # the same weights and adapters, never broken
    fragile: Path          # the adapter directory the tests delete and restore
    backup: Path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    root = tmp_path_factory.mktemp("lora-failures")
    config = write_tiny_config(root)
    arch, _ = random_arch(config)
    fragile = Path(write_random_adapter(str(root / "fragile"), arch, rank=4, seed=1, std=0.3))
    keep = write_random_adapter(str(root / "keep"), arch, rank=4, seed=2, std=0.3)
    backup = root / "backup"
    shutil.copytree(fragile, backup)
    loras = {"fragile": str(fragile), "keep": keep}
    llm = LLM(config, random_weights=True, num_blocks=64, block_size=4,
              max_loras=1, max_cpu_loras=1, loras=loras)
    oracle = LLM(config, random_weights=True, num_blocks=64, block_size=4,
                 loras=loras)
    yield Case(llm, oracle, fragile, backup)
    assert_pool_full(llm)


@pytest.fixture
def broken(case: Case) -> Iterator[Case]:
    """`fragile` evicted from the host cache, then its directory deleted; restored after."""
    case.llm.generate(PROMPTS[0], PARAMS, use_tqdm=False, lora="keep")   # takes the host copy
    shutil.rmtree(case.fragile)
    yield case
    shutil.copytree(case.backup, case.fragile)


def tokens(llm: LLM, prompt: list[int], lora: str | None, **kw: object) -> list[int]:
    params = SamplingParams(**{**PARAMS.__dict__, **kw}) if kw else PARAMS
    out = llm.generate(prompt, params, use_tqdm=False, lora=lora)[0]
    assert out.error is None
    return out.outputs[0].token_ids


def assert_slots_whole(llm: LLM) -> None:
    manager = llm.engine.runner.lora
    assert len(manager._slots) + len(manager._free_slots) == llm.config.lora.max_loras


def assert_failed(out, adapter: str) -> None:
    assert out.finished and out.error is not None
    assert f"adapter {adapter!r} could not be loaded" in out.error
    assert "not a PEFT adapter directory" in out.error
    assert all(c.finish_reason == "error" and c.token_ids == [] for c in out.outputs)


def test_a_lost_adapter_fails_its_requests_alone(case: Case) -> None:
    """Runs first: `fragile` has not computed the shared prefix in `case.llm` yet."""
    loras = ["fragile", None, "keep", "fragile"]
    want = [tokens(case.oracle, p, a) for p, a in zip(PROMPTS, loras)]
    assert len({tuple(w) for w in want[:3]}) == 3            # the adapters change the output
    case.llm.generate(PROMPTS[0], PARAMS, use_tqdm=False, lora="keep")
    shutil.rmtree(case.fragile)
    try:
        outs = case.llm.generate(PROMPTS, PARAMS, use_tqdm=False, lora=loras)
        assert_failed(outs[0], "fragile")
        assert_failed(outs[3], "fragile")
        assert [o.outputs[0].token_ids for o in outs[1:3]] == want[1:3]
        assert_slots_whole(case.llm)
        assert_pool_full(case.llm)
    finally:
        shutil.copytree(case.backup, case.fragile)
    # Blocks the failed step named but never filled were un-named: the shared prefix under
    # `fragile` is computed anew, and every request is right again.
    outs = case.llm.generate(PROMPTS, PARAMS, use_tqdm=False, lora=loras)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_every_sample_of_a_failed_request_fails_and_streams_end(broken: Case) -> None:
    out = broken.llm.generate(PROMPTS[1], SamplingParams(n=3, max_tokens=4, seed=1),
                              use_tqdm=False, lora="fragile")[0]
    assert len(out.outputs) == 3
    assert_failed(out, "fragile")
    streamed = list(broken.llm.stream(PROMPTS[2], PARAMS, lora="fragile"))
    assert len(streamed) == 1
    assert_failed(streamed[0], "fragile")
    assert_slots_whole(broken.llm)
    assert_pool_full(broken.llm)


def test_a_merge_of_a_lost_adapter_fails_with_both_names(case: Case) -> None:
    merged = case.llm.merge_loras({"fragile": 1.0, "keep": 0.5})
    want = tokens(case.llm, PROMPTS[1], merged)
    keep = tokens(case.llm, PROMPTS[2], "keep")       # the merge leaves host memory and slot
    shutil.rmtree(case.fragile)
    try:
        out = case.llm.generate(PROMPTS[1], PARAMS, use_tqdm=False, lora=merged)[0]
        assert out.error is not None and f"adapter {merged.name!r}" in out.error
        assert "adapter 'fragile'" in out.error and "not a PEFT adapter directory" in out.error
        assert tokens(case.llm, PROMPTS[2], "keep") == keep
        assert_slots_whole(case.llm)
    finally:
        shutil.copytree(case.backup, case.fragile)
    assert tokens(case.llm, PROMPTS[1], merged) == want


def test_a_batch_line_of_a_lost_adapter_gets_a_500_and_the_job_goes_on(broken: Case,
                                                                       tmp_path: Path) -> None:
    from taskloom.batch import BatchJob
    from tests.e2e.test_batch import read_output, request, successes, write_input
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    write_input(tmp_path / "in.jsonl", [
        request("base", "/v1/completions", {"model": "m", **body}),
        request("lost", "/v1/completions", {"model": "fragile", **body}),
        request("lost-2", "/v1/completions", {"model": "fragile", **body,
                                              "prompt": [PROMPTS[2], PROMPTS[3]]}),
        request("keep", "/v1/completions", {"model": "keep", **body}),
    ])
    summary = BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")).run(
        broken.llm, "m", progress=False)
    records = read_output(tmp_path / "out.jsonl")
    assert set(successes(records)) == {"base", "keep"}
    failed = {r["custom_id"]: r["response"] for r in records if r["custom_id"].startswith("lost")}
    assert set(failed) == {"lost", "lost-2"} and summary.errors == 2
    for response in failed.values():
        assert response["status_code"] == 500
        error = response["body"]["error"]
        assert error["type"] == "server_error" and "adapter 'fragile'" in error["message"]
    assert failed["lost-2"]["body"]["error"]["message"].startswith("prompt 0: ")
    assert_slots_whole(broken.llm)
    assert_pool_full(broken.llm)
