"""Benchmarks of the ``kfac`` package (not installed with it): ``cpu/`` runs on CPU, ``gpu/`` needs a CUDA device;
``common`` holds what they share. Run a script as ``python benchmarks/cpu/step_overhead.py`` (or
``python -m benchmarks.cpu.step_overhead`` from the repository root)."""
