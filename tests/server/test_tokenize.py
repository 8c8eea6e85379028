"""POST /tokenize and /detokenize (vLLM's) on a real server: a prompt or a conversation gives
the token ids the engine would be given, the same as the in-process tokenizer's, tools and a
reply's prefill (`continue_final_message`) included; ids come back as text; every mistake is
a 4xx naming it. A chat completion continuing its last message is the oracle's."""
from __future__ import annotations

import httpx
import openai
import pytest

from taskloom import LLM, SamplingParams
from taskloom.server.launch import ServerThread
from tests.server.conftest import MODEL
from tests.server.test_errors import assert_error, post

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours, comma-separated."}]
PREFILL = CONV + [{"role": "assistant", "content": "Red, green,"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def tokenize(server: ServerThread, body: dict) -> dict:
    r = post(server, "/tokenize", {"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_prompt_gives_the_tokenizers_ids(server: ServerThread, oracle: LLM) -> None:
    tok = oracle.tokenizer
    text = "The capital of France is Paris. <|im_end|> ünïcode 🌍"
    got = tokenize(server, {"prompt": text, "return_token_strs": True})
    assert got["tokens"] == tok.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == oracle.engine.scheduler.max_model_len
    assert got["token_strs"] == tok.convert_ids_to_tokens(got["tokens"])
    bare = tokenize(server, {"prompt": text, "add_special_tokens": False})
    assert bare["tokens"] == tok.encode(text, add_special_tokens=False)
    assert "token_strs" not in bare
    assert post(server, "/tokenize", {"prompt": "no model named"}).json()["tokens"] == \
        tok.encode("no model named")


def test_a_conversation_gives_the_prompt_a_chat_completion_is_given(
        server: ServerThread, oracle: LLM) -> None:
    tok = oracle.tokenizer
    assert tokenize(server, {"messages": CONV})["tokens"] == oracle.encode_chat(CONV)
    assert tokenize(server, {"messages": CONV, "add_generation_prompt": False})["tokens"] == \
        oracle.encode_chat(CONV, add_generation_prompt=False)
    got = tokenize(server, {"messages": PREFILL, "add_generation_prompt": False,
                            "continue_final_message": True})["tokens"]
    assert got == oracle.encode_chat(PREFILL, False, continue_final_message=True)
    assert tok.decode(got, skip_special_tokens=False).endswith("Red, green,")
    assert tokenize(server, {"messages": CONV, "tools": TOOLS})["tokens"] == \
        oracle.encode_chat(CONV, tools=TOOLS)
    # the template writes its own special tokens; add_special_tokens adds the model's too
    text = tok.apply_chat_template(CONV)
    assert tokenize(server, {"messages": CONV, "add_special_tokens": True})["tokens"] == \
        tok.encode(text, add_special_tokens=True)


def test_detokenize_gives_the_text_back(server: ServerThread, oracle: LLM) -> None:
    ids = oracle.encode_chat(CONV)
    r = post(server, "/detokenize", {"model": MODEL, "tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": oracle.tokenizer.apply_chat_template(CONV)}
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, words, param", [
    ("/tokenize", {"model": MODEL}, 400, ["prompt", "field required"], "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": 42}, 400, ["prompt", "string"], "prompt"),
    ("/tokenize", {"model": MODEL, "messages": []}, 400, ["messages"], "messages"),
    ("/tokenize", {"model": MODEL, "messages": PREFILL, "continue_final_message": True}, 400,
     ["continue_final_message needs add_generation_prompt set to false"],
     "continue_final_message"),
    ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, ["`gpt-9` does not exist"], "model"),
    ("/tokenize", [1, 2], 400, ["must be a JSON object"], None),
    ("/detokenize", {"model": MODEL, "tokens": [5, 10 ** 9]}, 400,
     ["token id 1000000000", "outside the vocabulary"], "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": "12"}, 400, ["tokens"], "tokens"),
])
def test_mistakes_are_named(server: ServerThread, path: str, body: object, status: int,
                            words: list[str], param: str | None) -> None:
    assert_error(post(server, path, body), status, *words, param=param)


def test_malformed_json_is_named(server: ServerThread) -> None:
    assert_error(post(server, "/tokenize", content=b'{"prompt": ',
                      headers={"Content-Type": "application/json"}), 400, "not valid JSON")
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_a_chat_completion_continues_its_last_message(client: openai.OpenAI,
                                                      server: ServerThread, oracle: LLM) -> None:
    """vLLM's extension: with continue_final_message the reply goes on from the
    assistant's prefill, as LLM.chat(..., continue_final_message=True) does."""
    want = oracle.chat(PREFILL, SamplingParams(temperature=0, max_tokens=12),
                       add_generation_prompt=False, continue_final_message=True,
                       use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(
        model=MODEL, messages=PREFILL, temperature=0, max_tokens=12,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert r.choices[0].message.content == want.text
    counted = tokenize(server, {"messages": PREFILL, "add_generation_prompt": False,
                                "continue_final_message": True})["count"]
    assert r.usage.prompt_tokens == counted
    with pytest.raises(openai.BadRequestError, match="continue_final_message needs"):
        client.chat.completions.create(model=MODEL, messages=PREFILL, max_tokens=2,
                                       extra_body={"continue_final_message": True})
