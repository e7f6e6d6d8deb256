"""Benchmarks that run on CPU (their committed results: ``benchmarks/cpu/results/``)."""
