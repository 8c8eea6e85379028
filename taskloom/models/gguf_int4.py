"""GGUF's 4-bit blocks as codes and per-group affine terms, for weights kept 4-bit
(`taskloom.ops.int4_linear`); and its Q8_0 blocks as int8 codes and scales, for an lm head
kept 8-bit (`taskloom.ops.small_linear`).

The `gguf` package reads the file and dequantizes its blocks to floats; it has no call that
hands back a block's integer codes and scales, which a 4-bit GEMM needs. This module takes
the blocks apart the way `gguf.quants` puts them together (its block sizes and, for Q4_K,
its own `get_scale_min` for the 6-bit sub-block scales), and the tests hold the result to
`gguf.quants.dequantize`: `codes * scale + min` is its float32 value, bit for bit.

- Q4_0, blocks of 32: fp16 d, 16 bytes of codes (low nibbles elements 0-15, high 16-31);
  `w = (q - 8) d`: scale d, min -8d.
- Q4_1, blocks of 32: fp16 d and m, then the codes as Q4_0's; `w = q d + m`.
- Q4_K, super-blocks of 256: fp16 d and dmin, 12 bytes of eight 6-bit scales and mins,
  128 bytes of codes (32-byte runs: low nibbles one sub-block of 32, high nibbles the next);
  `w = q (d sc_j) - dmin m_j` over sub-block j: scale d sc_j, min -(dmin m_j).
- Q8_0, blocks of 32: fp16 d, then 32 int8 codes; `w = q d`.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from taskloom.ops.int4_linear import INT4_GROUP_SIZE, Int4Weight
from taskloom.ops.small_linear import Q8Weight

Q = GGMLQuantizationType
INT4_GGUF_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Bytes [..., n * run] -> codes [..., 2 * n * run]: each run of `run` bytes gives its low
    nibbles, then its high ones."""
    runs = qs.reshape(*qs.shape[:-1], -1, 1, run)            # [..., n, 1, run]
    codes = (runs >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & np.uint8(0x0F)
    return codes.reshape(*qs.shape[:-1], -1)                 # [..., 2 * n * run]


def _fp16(b: np.ndarray) -> np.ndarray:
    """Two bytes a row [..., 2] as one float32 [..., 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def split_int4_blocks(raw: np.ndarray, qtype: GGMLQuantizationType,
                      shape: tuple[int, int]) -> Int4Weight:
    """A GGUF tensor's raw blocks (uint8, `rows` x bytes a row) of a Q4_0, Q4_1 or Q4_K
    weight of `shape` [rows, cols] -> its Int4Weight."""
    if qtype not in INT4_GGUF_TYPES:
        raise ValueError(f"{qtype.name} is not a 4-bit affine GGUF type "
                         f"({', '.join(t.name for t in INT4_GGUF_TYPES)})")
    rows, cols = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block_size or raw.size != rows * cols // block_size * type_size:
        raise ValueError(f"{qtype.name} blocks of {raw.size} bytes do not hold a "
                         f"[{rows}, {cols}] weight")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // block_size, type_size)
    if qtype == Q.Q4_K:
        scales, mins, codes = _split_q4_k(blocks)
    else:
        d = _fp16(blocks[..., 0:2])                          # [rows, blocks, 1]
        if qtype == Q.Q4_0:
            m, qs = -8 * d, blocks[..., 2:]
        else:
            m, qs = _fp16(blocks[..., 2:4]), blocks[..., 4:]
        scales, mins, codes = d[..., 0], m[..., 0], _nibbles(qs, block_size // 2)
    groups = cols // INT4_GROUP_SIZE
    return Int4Weight(torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols))),
                      torch.from_numpy(np.ascontiguousarray(scales.reshape(rows, groups))),
                      torch.from_numpy(np.ascontiguousarray(mins.reshape(rows, groups))))


def _split_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks [rows, n, 144] -> scales, mins [rows, n, 8] and codes [rows, n, 256]."""
    rows, n, _ = blocks.shape
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])   # [rows, n, 1]
    scale_bytes = blocks[..., 4:4 + Q4_K.K_SCALE_SIZE].reshape(rows * n, Q4_K.K_SCALE_SIZE)
    sc, m = Q4_K.get_scale_min(scale_bytes)                  # [rows * n, 8] each
    scales = d * sc.reshape(rows, n, 8).astype(np.float32)
    mins = -(dmin * m.reshape(rows, n, 8).astype(np.float32))
    codes = _nibbles(blocks[..., 4 + Q4_K.K_SCALE_SIZE:], INT4_GROUP_SIZE)
    return scales, mins, codes


def split_q8_0_blocks(raw: np.ndarray, shape: tuple[int, int]) -> Q8Weight:
    """A GGUF Q8_0 tensor's raw blocks (uint8, `rows` x bytes a row) of a weight of `shape`
    [rows, cols] -> its Q8Weight."""
    rows, cols = shape
    block_size, type_size = GGML_QUANT_SIZES[Q.Q8_0]
    if cols % block_size or raw.size != rows * cols // block_size * type_size:
        raise ValueError(f"Q8_0 blocks of {raw.size} bytes do not hold a [{rows}, {cols}] "
                         f"weight")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // block_size, type_size)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols)
    scales = _fp16(blocks[..., 0:2])[..., 0]                 # [rows, blocks]
    return Q8Weight(torch.from_numpy(codes), torch.from_numpy(np.ascontiguousarray(scales)))
