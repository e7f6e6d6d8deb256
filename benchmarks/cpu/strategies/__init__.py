"""Pieces of the distributed-strategies benchmark (``benchmarks/cpu/distributed.py``): ``configs`` (the
configurations compared), ``counters`` (bytes of the DDP all-reduce, machine CPU time), ``worker`` (what each rank
runs), ``launch`` (the spawn and torchrun launchers, deadlines), ``summary`` (per-configuration statistics from the
ranks' reports), ``report`` (tables, the at-scale summary of ``planner_scale.json``) and ``plot``."""
