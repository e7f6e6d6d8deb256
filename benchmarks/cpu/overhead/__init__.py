"""Pieces of the step-overhead benchmark (``benchmarks/cpu/step_overhead.py``): ``configs`` (schedules, methods,
hyperparameters), ``runners`` (one configuration in this process, or KAISA's in a worker process, and one timed
window), ``timing`` (interleaved windows, the summary table), ``profile`` (the phase breakdown of ``--profile``)
and ``plot``."""
