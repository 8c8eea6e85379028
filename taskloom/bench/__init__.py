"""Benchmarks (`taskloom bench ...`): each prints a JSON line last, optionally beside a peer."""
