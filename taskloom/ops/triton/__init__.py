"""Triton kernels for the GPU path, one module per op, each a drop-in for its torch reference.

Nothing on a CPU import path imports this package: `taskloom.ops.backend` imports it lazily,
and only when a model is built on a CUDA device with Triton installed. Tests run the kernels on
the CPU through the Triton interpreter (`TRITON_INTERPRET=1`).
"""
