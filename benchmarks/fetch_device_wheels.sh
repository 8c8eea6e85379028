#!/usr/bin/env bash
# Fetch, on this machine, the Python 3.12 wheels of the HTTP stack that the device image lacks
# (FastAPI, Starlette, uvicorn with uvloop and httptools, pydantic and what they need beyond the
# image's packages), into
# .whl/, which git ignores through .git/info/exclude. A device call that serves (run_gpu.sh
# serve) names .whl in its carry; run_gpu.sh installs them first. The versions are the ones
# this checkout's .venv runs, so the device serves with what the tests here ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
names = ["fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic",
         "pydantic-core", "annotated-types", "typing-inspection", "opentelemetry-api"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
du -sh .whl
