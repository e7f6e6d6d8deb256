"""Parameters sharded in a way K-FAC does not model (tensor parallelism's ``Shard(1)``; FSDP2's and HSDP's layouts
are supported: tests/integration/test_fsdp.py) are refused with a clear error naming the placements, instead of
failing at the first step inside a matrix product; the rest of the model still trains with ``skip_layers``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "support" / "fsdp_guard_worker.py"


def test_tensor_parallel_parameters_are_a_clear_error_and_skipping_them_trains_the_rest():
    pytest.importorskip("torch.distributed.tensor.parallel")
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR: kfac: parameter '0.weight' is a DTensor with placements (Shard(dim=1),)" in proc.stdout
    assert "tensor parallelism is not supported" in proc.stdout
    assert "LAYERS: ['2']" in proc.stdout
