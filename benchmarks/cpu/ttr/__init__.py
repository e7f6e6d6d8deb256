"""Pieces of the time-to-result benchmarks (``benchmarks/cpu/time_to_result.py``, ``benchmarks/cpu/batch_scaling.py``):
``workloads`` (data, model, loss and metric of each workload), ``optimizers`` (the optimizers compared and their
learning-rate grids) and ``runner`` (one training run, tuning, steps to a target and the per-workload summary)."""
