"""Benchmarks (``homering bench …``): print numbers and write JSON."""
