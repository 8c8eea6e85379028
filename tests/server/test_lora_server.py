"""LoRA adapters over the OpenAI API: picked by `model`, listed by /v1/models, loaded and
unloaded at runtime (vLLM's endpoints), merged per request (`merged_adapters`), and every
mistake a clear 4xx. Outputs equal `LLM.generate` with the same adapter."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from taskloom import LLM, SamplingParams
from taskloom.lora.random_adapter import write_random_adapter
from taskloom.models.loader import random_arch
from taskloom.server.launch import ServerThread
from tests.server.conftest import MODEL, start_server, wait_idle
from tests.server.test_errors import assert_error, post

PROMPT = "The best way to learn a language is"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    arch, _ = random_arch("smollm2-135m")     # the embedded model's shape
    return {
        "alpha": write_random_adapter(str(root / "alpha"), arch, rank=8, seed=1, std=0.05),
        "beta": write_random_adapter(str(root / "beta"), arch, rank=8, seed=2, std=0.15,
                                     targets=("q_proj", "v_proj", "down_proj")),
        "wide": write_random_adapter(str(root / "wide"), arch, rank=16, seed=3, std=0.05),
    }


@pytest.fixture(scope="module")
def lora_llm(adapters: dict[str, str]) -> LLM:
    return LLM(max_num_seqs=8, kv_cache_memory_gb=0.1, loras={"alpha": adapters["alpha"]},
               max_loras=2)


@pytest.fixture(scope="module")
def lora_server(lora_llm: LLM) -> Iterator[ServerThread]:
    st = start_server(lora_llm, loras=lora_llm.loras)
    yield st
    st.stop()
    wait_idle(lora_llm)


@pytest.fixture(scope="module")
def lora_oracle(adapters: dict[str, str]) -> LLM:
    return LLM(max_num_seqs=8, kv_cache_memory_gb=0.1, loras=adapters, max_loras=3)


@pytest.fixture
def lclient(lora_server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_server.base_url + "/v1", api_key="unused",
                         max_retries=0, timeout=120)


def expected(oracle: LLM, lora: object, n: int = 12) -> str:
    return oracle.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n),
                           use_tqdm=False, lora=lora)[0].outputs[0].text


def test_models_lists_the_adapters(lclient: openai.OpenAI, adapters: dict[str, str]) -> None:
    data = {m.id: m for m in lclient.models.list().data}
    assert set(data) == {MODEL, "alpha"}
    assert data["alpha"].parent == MODEL and data["alpha"].root == adapters["alpha"]


def test_completion_with_an_adapter_equals_generate(lclient: openai.OpenAI,
                                                    lora_oracle: LLM) -> None:
    got = lclient.completions.create(model="alpha", prompt=PROMPT, max_tokens=12,
                                     temperature=0)
    assert got.model == "alpha"
    assert got.choices[0].text == expected(lora_oracle, "alpha")
    base = lclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert base.model == MODEL and base.choices[0].text == expected(lora_oracle, None)
    assert base.choices[0].text != got.choices[0].text


def test_load_stream_and_unload_at_runtime(lora_server: ServerThread, lclient: openai.OpenAI,
                                           adapters: dict[str, str], lora_oracle: LLM) -> None:
    r = post(lora_server, "/v1/load_lora_adapter",
             {"lora_name": "beta", "lora_path": adapters["beta"]})
    assert r.status_code == 200 and "beta" in r.text
    assert_error(post(lora_server, "/v1/load_lora_adapter",
                      {"lora_name": "beta", "lora_path": adapters["beta"]}), 400, "in use")
    stream = lclient.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
        temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    want = lora_oracle.chat([{"role": "user", "content": PROMPT}],
                            SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                            lora="beta")[0].outputs[0].text
    assert text == want
    r = post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert r.status_code == 200
    assert "beta" not in {m.id for m in lclient.models.list().data}
    with pytest.raises(openai.NotFoundError, match="alpha"):
        lclient.completions.create(model="beta", prompt=PROMPT, max_tokens=2)
    assert_error(post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta"}), 404,
                 "no adapter named 'beta'", param="lora_name")


def test_merged_adapters_equal_the_offline_merge(lora_server: ServerThread,
                                                 adapters: dict[str, str],
                                                 lora_oracle: LLM) -> None:
    r = post(lora_server, "/v1/load_lora_adapter",
             {"lora_name": "beta2", "lora_path": adapters["beta"]})
    assert r.status_code == 200
    mix = {"adapters": {"alpha": 0.7, "beta2": 0.6}, "method": "ties", "density": 0.5}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
            "merged_adapters": mix}
    first = post(lora_server, "/v1/completions", body)
    again = post(lora_server, "/v1/completions", body)      # the cached merge
    assert first.status_code == 200, first.text
    merged = lora_oracle.merge_loras({"alpha": 0.7, "beta": 0.6}, "ties", density=0.5)
    assert first.json()["choices"][0]["text"] == expected(lora_oracle, merged)
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "beta2"})


@pytest.mark.parametrize("body,status,words,param", [
    ({"lora_name": "x", "lora_path": "/nonexistent/adapter"}, 400,
     ["not a PEFT adapter directory"], "lora_path"),
    ({"lora_name": "bad name", "lora_path": "/tmp"}, 400, ["invalid"], "lora_name"),
    ({"lora_name": MODEL, "lora_path": "/tmp"}, 400, ["base model"], "lora_name"),
    ({"lora_name": "x"}, 400, ["lora_path"], None),
])
def test_load_errors(lora_server: ServerThread, body: dict, status: int, words: list[str],
                     param: str | None) -> None:
    assert_error(post(lora_server, "/v1/load_lora_adapter", body), status, *words, param=param)


def test_too_wide_adapter_is_refused_with_its_rank(lora_server: ServerThread,
                                                   adapters: dict[str, str],
                                                   lora_llm: LLM) -> None:
    lora_llm_rank = lora_llm.config.lora.max_lora_rank
    assert lora_llm_rank == 16
    r = post(lora_server, "/v1/load_lora_adapter",
             {"lora_name": "wide", "lora_path": adapters["wide"]})
    assert r.status_code == 200          # rank 16 fits
    mix = {"adapters": {"alpha": 1.0, "wide": 1.0}}
    assert_error(post(lora_server, "/v1/completions",
                      {"model": MODEL, "prompt": PROMPT, "merged_adapters": mix}), 400,
                 "rank 8", "rank 16", param="merged_adapters")
    post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "wide"})


@pytest.mark.parametrize("body,status,words,param", [
    ({"model": "nope", "prompt": "x"}, 404, ["`nope` does not exist", "`alpha`"], "model"),
    ({"model": MODEL, "prompt": "x", "merged_adapters": {"adapters": {"ghost": 1.0}}}, 400,
     ["no adapter named 'ghost'"], "merged_adapters"),
    ({"model": MODEL, "prompt": "x",
      "merged_adapters": {"adapters": {"alpha": 1.0}, "method": "svd"}}, 400,
     ["merge method"], "merged_adapters"),
    ({"model": "alpha", "prompt": "x", "merged_adapters": {"adapters": {"alpha": 1.0}}}, 400,
     ["base model"], "merged_adapters"),
])
def test_request_errors(lora_server: ServerThread, body: dict, status: int, words: list[str],
                        param: str) -> None:
    assert_error(post(lora_server, "/v1/completions", body), status, *words, param=param)


def test_server_without_lora_support_says_so(server: ServerThread) -> None:
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}),
                 400, "without LoRA support")
    assert_error(post(server, "/v1/completions", {
        "model": MODEL, "prompt": "x", "merged_adapters": {"adapters": {"a": 1.0}}}), 400,
        "LoRA support", param="merged_adapters")


def test_requests_still_served_after_errors(lclient: openai.OpenAI, lora_llm: LLM) -> None:
    got = lclient.completions.create(model="alpha", prompt=PROMPT, max_tokens=3)
    assert got.choices[0].finish_reason == "length"
    wait_idle(lora_llm)
    with httpx.Client() as http:
        assert http.get(str(lclient.base_url).replace("/v1/", "/health")).status_code == 200


def test_batch_job_serves_adapters_and_merges(tmp_path: Path, lora_oracle: LLM) -> None:
    """`taskloom batch` lines pick adapters by `model` and merges by `merged_adapters`, as the
    server does; a bad merge is that line's 400, and the job goes on."""
    from taskloom.batch import BatchJob
    from tests.e2e.test_batch import read_output, request, successes, write_input
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    mix = {"adapters": {"alpha": 1.0, "beta": 1.0}, "method": "dare_linear", "density": 0.7,
           "seed": 3}
    write_input(tmp_path / "in.jsonl", [
        request("base", "/v1/completions", {"model": "whatever", **body}),
        request("alpha", "/v1/completions", {"model": "alpha", **body}),
        request("beta", "/v1/completions", {"model": "beta", **body}),
        request("mix", "/v1/completions", {"model": "m", "merged_adapters": mix, **body}),
        request("bad-mix", "/v1/completions", {"model": "m", **body, "merged_adapters": {
            "adapters": {"alpha": 1.0, "wide": 1.0}}}),
    ])
    job = BatchJob(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))
    job.run(lora_oracle, "served", progress=False)
    records = read_output(tmp_path / "out.jsonl")
    ok = successes(records)
    merged = lora_oracle.merge_loras({"alpha": 1.0, "beta": 1.0}, "dare_linear", density=0.7,
                                     seed=3)
    for cid, lora, model in [("base", None, "served"), ("alpha", "alpha", "alpha"),
                             ("beta", "beta", "beta"), ("mix", merged, "served")]:
        assert ok[cid]["model"] == model
        assert ok[cid]["choices"][0]["text"] == expected(lora_oracle, lora), cid
    assert len({ok[c]["choices"][0]["text"] for c in ok}) == 4
    bad = next(r for r in records if r["custom_id"] == "bad-mix")["response"]
    assert bad["status_code"] == 400 and "rank" in bad["body"]["error"]["message"]
    wait_idle(lora_oracle)


def test_an_adapter_that_cannot_be_loaded_again_is_a_500_for_its_requests_alone(
        tmp_path: Path) -> None:
    """`fragile` left host memory (one host copy) and its directory was deleted: its requests
    get a 500 that names it (an error event when streamed), every other request is served,
    and it serves again once its files are back."""
    import shutil

    from tests.models.tiny_models import write_tiny_config
    config = write_tiny_config(tmp_path)
    arch, _ = random_arch(config)
    fragile = write_random_adapter(str(tmp_path / "fragile"), arch, rank=4, seed=1)
    keep = write_random_adapter(str(tmp_path / "keep"), arch, rank=4, seed=2)
    shutil.copytree(fragile, tmp_path / "backup")
    llm = LLM(config, random_weights=True, num_blocks=64, block_size=4, max_loras=1,
              max_cpu_loras=1, loras={"fragile": fragile, "keep": keep})
    shutil.rmtree(fragile)
    st = start_server(llm, loras=llm.loras)
    client = openai.OpenAI(base_url=st.base_url + "/v1", api_key="unused", max_retries=0)
    body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "ignore_eos": True}
    try:
        assert_error(post(st, "/v1/completions", {"model": "fragile", **body}), 500,
                     "adapter 'fragile' could not be loaded", "not a PEFT adapter directory",
                     type_="server_error")
        assert_error(post(st, "/v1/completions", {"model": "fragile", **body,
                                                  "prompt": [[5, 6], [7, 8]]}), 500,
                     "prompt 0: adapter 'fragile'", type_="server_error")
        stream = client.completions.create(model="fragile", prompt=body["prompt"], max_tokens=4,
                                           stream=True)
        with pytest.raises(openai.APIError, match="adapter 'fragile' could not be loaded"):
            list(stream)
        for model in (MODEL, "keep"):
            r = post(st, "/v1/completions", {"model": model, **body})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        shutil.copytree(tmp_path / "backup", fragile)
        assert post(st, "/v1/completions", {"model": "fragile", **body}).status_code == 200
        wait_idle(llm)
    finally:
        st.stop()
