"""Benchmarks and the process harness they share with the scale-out tests."""
