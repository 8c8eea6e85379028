"""The engine core must never import torch (DESIGN.md): checked in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys


def test_engine_imports_no_torch() -> None:
    code = ("import sys, taskloom, taskloom.engine.core, taskloom.engine.scheduler, "
            "taskloom.engine.kv_cache; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
