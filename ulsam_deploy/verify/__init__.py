"""Verification: the parity accumulator and run, inspect and its per-layer probes."""
