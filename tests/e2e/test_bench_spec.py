"""`taskloom bench spec` end to end on the embedded model: the built-in code-editing workload
and a prompts file, drafts on against off in one run with the same outputs, the HF prompt
lookup peer, and the summary's lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskloom.bench import peers
from taskloom.bench.spec import builtin_conversations, file_conversations, topic_conversations
from taskloom.bench.summary import result_lines
from taskloom.cli import main
from tests.models.hf_smollm import load_hf_smollm


def test_builtin_workload_is_code_to_edit() -> None:
    convs = builtin_conversations(40)
    assert len(convs) == 40 and len({c[0]["content"] for c in convs}) > 20
    assert all("```python\ndef " in c[0]["content"] for c in convs)


def test_topic_workload_holds_out_every_fifth_topic() -> None:
    train, held_out = topic_conversations("train"), topic_conversations("eval")
    assert len(train) + len(held_out) == 4 * 79 and len(held_out) == 4 * 16
    texts = {c[0]["content"] for c in train}
    assert len(texts) == len(train) and not texts & {c[0]["content"] for c in held_out}
    with pytest.raises(ValueError, match="split must be"):
        topic_conversations("test")


def test_prompts_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Repeat: a b c"}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert file_conversations(str(path)) == [
        [{"role": "user", "content": "Repeat: a b c"}], [{"role": "user", "content": "hi"}]]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: expected a \"prompt\" string"):
        file_conversations(str(path))


def test_spec_bench_refuses_what_it_cannot_compare(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "spec", "--random-weights", "--model", "smollm2-135m"]) == 2
    assert "--random-weights has neither" in capsys.readouterr().err
    assert main(["bench", "spec", "--temperature", "0.7"]) == 2
    assert "--temperature above 0 needs --seed" in capsys.readouterr().err
    for method in ("medusa", "hydra"):
        assert main(["bench", "spec", "--peer", "hf", "--speculative-config",
                     f'{{"method": "{method}", "model": "/heads"}}']) == 2
        assert (f"which is not {method} (HF transformers has no draft-head decoding)"
                in capsys.readouterr().err)


def test_spec_bench_with_the_hf_peer(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer is HF transformers on the embedded file's weights, read through the test
    suite's shared reading of it (tests/models/hf_smollm.py: HF's GGUF reader takes 20 s,
    which the fidelity tests pay once for everyone) rather than a reading of its own."""
    monkeypatch.setattr(peers, "load_hf_model",
                        lambda a, attn_implementation=None: load_hf_smollm())
    out = tmp_path / "result.json"
    rc = main(["bench", "spec", "--batch-sizes", "1", "2", "--output-len", "16", "--dtype",
               "float32", "--repeats", "1", "--peer", "hf", "--peer-num-prompts", "1",
               "--speculative-config", '{"num_speculative_tokens": 3}',
               "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    assert result == json.loads(out.read_text())
    assert result["speculative_config"]["num_speculative_tokens"] == 3
    assert [r["batch_size"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        assert r["outputs_identical"]
        assert r["spec"]["output_tokens"] == r["base"]["output_tokens"]
        assert r["spec"]["steps"] < r["base"]["steps"]
        assert 0 < r["spec"]["accepted_tokens"] <= r["spec"]["draft_tokens"]
    assert result["peer"]["outputs_identical"]
    assert result["ratio_vs_peer"] == pytest.approx(
        result["peer_taskloom"]["output_tokens_per_s"]
        / result["peer"]["output_tokens_per_s"], rel=1e-2)
    lines = result_lines(result)
    assert printed[:-1][-len(lines):] == lines and "same outputs" in lines[0]
