"""Ops: one module per op, each with a plain torch reference (the oracle and the CPU path)."""
