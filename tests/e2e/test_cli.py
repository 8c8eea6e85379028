"""The `taskloom` command as a user runs it: a real process, real stdin/stdout."""
from __future__ import annotations

import os
import subprocess
import sys

from taskloom import LLM, SamplingParams

TASKLOOM = [sys.executable, "-m", "taskloom.cli"]


def run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    """`taskloom ARGS` in float32, the dtype of the `llm` oracle (the CLI's default is auto)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(TASKLOOM + args + ["--dtype", "float32"], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def test_generate_streams_the_greedy_completion(llm: LLM) -> None:
    """One process (each start loads the model again): with drafts, whose outputs are the
    plain greedy ones, so the flags of both reach the engine."""
    prompt = "The three primary colors are"
    expected = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20))[0]
    proc = run(["generate", prompt, "--max-tokens", "20", "--temperature", "0",
                "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.outputs[0].text + "\n"


def test_chat_repl_multi_turn_reset_and_exit(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24)
    first = llm.chat([{"role": "user", "content": "Name a color."}], params)[0].outputs[0].text
    second = llm.chat([{"role": "user", "content": "Name a color."},
                       {"role": "assistant", "content": first},
                       {"role": "user", "content": "Another one?"}], params)[0].outputs[0].text
    proc = run(["chat", "--temperature", "0", "--max-tokens", "24"],
               stdin="Name a color.\nAnother one?\n/reset\nName a color.\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count(first) == 2 and second in out and "(conversation reset)" in out


def test_bad_flags_give_a_clear_error_and_exit_code() -> None:
    proc = run(["generate", "hi", "--top-p", "0"])
    assert proc.returncode == 2
    assert "top_p must be in (0, 1], got 0.0" in proc.stderr
    proc = run(["generate", "hi", "--device", "gpu"])
    assert proc.returncode == 2 and "device must be cpu or cuda" in proc.stderr
    proc = run(["generate", "hi", "--quantization", "gguf"])             # with float32
    assert proc.returncode == 2
    assert "runs 4-bit weights with bfloat16 activations on a CPU" in proc.stderr
    proc = run(["generate", "hi", "--model", "/no/such/model.gguf"])
    assert proc.returncode == 2 and "/no/such/model.gguf" in proc.stderr
    proc = run(["generate", "hi", "--speculative-config", "{num_speculative_tokens: 3}"])
    assert proc.returncode == 2 and "--speculative-config: not JSON" in proc.stderr
    proc = run(["generate", "hi", "--speculative-config", '{"num_speculative_tokens": 0}'])
    assert proc.returncode == 2
    assert "num_speculative_tokens must be >= 1, got 0" in proc.stderr


_FREEZE_PROBE = """
import gc, sys
import taskloom.cli as cli
from taskloom.bench.common import release_device_memory
args = cli.build_parser().parse_args(["bench", "throughput", "--random-weights", "--model",
                                      sys.argv[1]])
cli.make_llm(args)
as_main = gc.get_freeze_count()
cli._FREEZE_HEAP_AFTER_BUILD = True        # what run(), the taskloom command, sets
llm = cli.make_llm(args)
as_command = gc.get_freeze_count()
del llm
release_device_memory("cpu")                # before a peer runs: the engine can be collected
print(as_main, as_command, gc.get_freeze_count())
"""


def test_the_command_freezes_its_startup_heap_and_a_peer_run_unfreezes_it(tmp_path) -> None:
    """`taskloom` moves the heap it has once its engine is built out of the collector's walks
    (a caller of main() in its own process keeps its heap as it is), and frees it again
    before a benchmark's peer needs the engine's memory back."""
    from tests.models.tiny_models import write_tiny_config
    out = subprocess.run([sys.executable, "-c", _FREEZE_PROBE, write_tiny_config(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True)
    as_main, as_command, after_release = map(int, out.stdout.split())
    assert as_main == 0 and as_command > 10_000 and after_release == 0
