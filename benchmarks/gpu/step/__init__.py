"""Pieces of the GPU step-time benchmark (``benchmarks/gpu/gpu_step.py``): ``configs`` (the model setups and the
configurations' hyperparameters), ``runners`` (one configuration, its per-step clock, building and warming up),
``timing`` (interleaved timed windows, the summary and its table), ``machine`` (GPU and ``kfac.ext`` facts) and
``plot``."""
