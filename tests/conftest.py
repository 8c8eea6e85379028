"""Session-wide test setup: the Triton interpreter where no CUDA device is present, and the
CPU's cores shared among pytest-xdist's workers.

Triton picks the interpreter when a function is decorated with `@triton.jit`, its own library
functions included, and torch._dynamo imports triton whenever triton is installed, so
`TRITON_INTERPRET=1` must be in the environment before any test module is imported. It only
matters to the kernel tests (tests/ops/test_triton_kernels.py): without CUDA nothing else runs
Triton. Where CUDA is present the kernels are compiled and the variable is left alone.

`make test` runs the suite in two worker processes (`-n 2`): much of it is single-threaded
host work (the engine's scheduling, servers, subprocesses starting), which one process
cannot spread over two cores. Each worker then takes its share of the cores for torch, and
the processes it starts inherit that share (OMP_NUM_THREADS), rather than every process
spinning a thread on every core. What every worker would read alike and slowly (HF's
reading of the embedded GGUF file: tests/models/hf_smollm.py) is read once for them all, in
the run's shared temporary directory, as is the tiny chat model of engine-behaviour tests
(tests/models/tiny_chat.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    _share = max(1, len(os.sched_getaffinity(0)) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)


@pytest.fixture(scope="session", autouse=True)
def _xdist_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """TASKLOOM_TESTS_SHARED_DIR: the parent of the workers' own temporary directories."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = tmp_path_factory.getbasetemp().parent
        os.environ["TASKLOOM_TESTS_SHARED_DIR"] = str(shared)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The directory of a tiny random-weight Llama with the embedded model's tokenizer, for
    tests of the engine's behaviour rather than of the model's numbers."""
    from tests.models.tiny_chat import tiny_chat_model
    shared = os.environ.get("TASKLOOM_TESTS_SHARED_DIR")
    return tiny_chat_model(Path(shared) if shared else tmp_path_factory.getbasetemp())
