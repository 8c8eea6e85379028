"""llama.cpp as a peer on the CPU, where it is installed: the same batches through llama.cpp's
own batched benchmark (`llama-batched-bench`) on the same GGUF weights, in the same run.

`llama-batched-bench` prefills B prompts of PP random tokens in one batch and then decodes TG
steps of one token per sequence, timing both (`t_pp`, `t_tg`). With PP = `--input-len` and TG =
`--output-len - 1` that is what `taskloom bench latency` times per batch size: the time to
the first token of every request (the prefill yields each request's first token) and the
decode of the rest. It samples nothing: the peer's decode leaves out a sampler's cost.

The weights: llama.cpp runs a GGUF file's tensors as they are stored, quantized ones with its
quantized kernels, where taskloom dequantizes them once at load into `--dtype`. By default the
peer therefore runs a copy of the file with every matrix in that dtype (`gguf_copy_as`: F32,
F16 or BF16), so both read the same bytes a token and the ratio compares the engines; with
`--peer-weights file` it runs the file as it is, which is what a llama.cpp user would run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, LlamaFileType

BATCHED_BENCH = "llama-batched-bench"
BUILD_HINT = ("install llama.cpp, or build it with benchmarks/build_llama_cpp.sh (from the "
              "llama.cpp sources in PyPI's llama-cpp-python), and put its programs on PATH "
              "or name their folder with --llama-cpp-dir")


def find_tool(name: str, directory: str | None) -> str:
    """The path of llama.cpp's program `name`: in `directory` if given, else on PATH."""
    if directory is not None:
        path = os.path.join(os.path.abspath(os.path.expanduser(directory)), name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"{name} is not in --llama-cpp-dir {directory}: "
                                    f"{BUILD_HINT}")
        return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not on PATH: {BUILD_HINT}")
    return found


def _ggml_type(dtype: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    """The GGUF tensor type of `dtype` and the file type a file of such matrices declares."""
    import gguf
    types = {"float32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             "float16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bfloat16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
    if dtype not in types:
        raise ValueError(f"no GGUF type for dtype {dtype!r}; expected one of {sorted(types)}")
    return types[dtype]


def gguf_copy_as(src: str, dst: str, dtype: str) -> None:
    """Write the GGUF file `src` to `dst` with its matrices in `dtype` (float32, float16 or
    bfloat16): every tensor is dequantized (`gguf.quants`) and stored in that type, vectors
    (norm weights) in F32 as llama.cpp's converter keeps them; the metadata is copied but for
    `general.file_type`. Tensors are converted one at a time, so memory holds one."""
    import gguf
    from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

    from taskloom.models.gguf_reader import open_gguf

    matrix_type, file_type = _ggml_type(dtype)
    reader = open_gguf(src)     # parsed once: taskloom's own load of the file read it already
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ValueError(f"{src}: only little-endian GGUF files can be copied")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        # the writer adds the architecture itself; GGUF.* are the reader's virtual fields
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or \
                field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(int(file_type))
    plan = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))   # numpy's order; GGUF's is reversed
        qtype = matrix_type if len(shape) > 1 else gguf.GGMLQuantizationType.F32
        byte_shape = quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8),
                               int(np.prod(byte_shape)), raw_dtype=qtype)
        plan.append((t, shape, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, shape, qtype in plan:
        values = np.asarray(dequantize(np.asarray(t.data), t.tensor_type),
                            dtype=np.float32).reshape(shape)
        writer.write_tensor_data(np.ascontiguousarray(quantize(values, qtype)).view(np.uint8))
    writer.close()


def peer_gguf(a: argparse.Namespace, workdir: str) -> tuple[str, str]:
    """The GGUF file llama.cpp runs and what its weights are: the model's own file
    (`--peer-weights file`) or its copy in `--dtype` written into `workdir`."""
    from taskloom.models.loader import resolve_model_path

    path = resolve_model_path(a.model)
    if a.peer_weights == "file":
        return path, f"{os.path.basename(path)} as stored"
    copy = os.path.join(workdir, f"weights-{a.dtype}.gguf")
    gguf_copy_as(path, copy, a.dtype)
    return copy, f"{os.path.basename(path)} in {_ggml_type(a.dtype)[0].name}"


def check_llama_cpp_peer(a: argparse.Namespace) -> str:
    """Refuse, before taskloom's run, what the llama.cpp peer cannot do; its program's path."""
    if a.device != "cpu":
        raise ValueError(f"--peer llama.cpp runs on the CPU; got --device {a.device}")
    if a.random_weights:
        raise ValueError("--peer llama.cpp needs the model's weights in a GGUF file, not "
                         "--random-weights")
    from taskloom.models.loader import resolve_model_path
    if not resolve_model_path(a.model).endswith(".gguf"):
        raise ValueError(f"--peer llama.cpp reads GGUF files; {a.model} is not one (llama.cpp's "
                         f"convert_hf_to_gguf.py writes one from a Hugging Face directory)")
    tool = find_tool(BATCHED_BENCH, a.llama_cpp_dir)
    helped = subprocess.run([tool, "--help"], capture_output=True, text=True)
    if "--output-format {md,jsonl}" not in helped.stdout + helped.stderr:
        raise ValueError(f"{tool} is too old: it cannot print its results as JSON lines "
                         f"(--output-format jsonl); {BUILD_HINT}")
    return tool


def llama_cpp_latency(a: argparse.Namespace, tool: str, threads: int) -> dict:
    """Per batch size of `a.batch_sizes`: llama.cpp's time to the first token of every
    request and its decode tokens/s, run with `threads` threads."""
    with tempfile.TemporaryDirectory(prefix="taskloom-llama-cpp-") as workdir:
        path, weights = peer_gguf(a, workdir)
        # a KV cache of max(B) sequences of input + output tokens: llama-batched-bench skips,
        # without a word, a batch whose tokens do not fit
        ctx = max(a.batch_sizes) * (a.input_len + a.output_len)
        args = ["-c", str(ctx), "-npp", str(a.input_len), "-ntg", str(a.output_len - 1),
                "-npl", ",".join(map(str, a.batch_sizes)), "-t", str(threads),
                "--output-format", "jsonl"]
        proc = subprocess.run([tool, "-m", path, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{BATCHED_BENCH} failed (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    by_batch = {line["pl"]: line for line in lines}
    missing = [b for b in a.batch_sizes if b not in by_batch]
    if missing:
        raise RuntimeError(f"{BATCHED_BENCH} reported no result for batch sizes {missing}: "
                           f"{proc.stdout[-1000:]}{proc.stderr[-1000:]}")
    rows = [{"batch_size": b, "ttft_ms": round(1000 * by_batch[b]["t_pp"], 2),
             "decode_tokens_per_s": round(by_batch[b]["speed_tg"], 2)} for b in a.batch_sizes]
    first = by_batch[a.batch_sizes[0]]
    return {"name": "llama.cpp-batched-bench", "version": _version(tool), "weights": weights,
            "threads": first["n_threads"], "flash_attn": first["flash_attn"],
            "command": " ".join([BATCHED_BENCH, "-m", os.path.basename(path), *args]),
            "results": rows}


def _version(tool: str) -> str | None:
    """llama.cpp's build (`version: N (commit)`), which it prints to stderr."""
    proc = subprocess.run([tool, "--version"], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return None
