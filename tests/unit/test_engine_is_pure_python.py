"""The engine core must never import torch (DESIGN.md), and neither must the server's side of
an engine in its own process (the HTTP app, the clients): checked in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys


def test_engine_imports_no_torch() -> None:
    code = ("import sys, taskloom, taskloom.engine.core, taskloom.engine.scheduler, "
            "taskloom.engine.kv_cache; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_server_side_of_an_engine_process_imports_no_torch() -> None:
    code = ("import sys, taskloom.cli, taskloom.engine.client, taskloom.engine.core_process, "
            "taskloom.server.app, taskloom.server.launch; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
