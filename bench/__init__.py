"""Benchmarks (`python -m bench.run`) and their process harness; the tests do not import them."""
