"""Benchmarks that need a CUDA device (their committed results: ``benchmarks/gpu/results/``)."""
