"""FSDP2-sharded parameters (DTensor shards) are refused with a clear error naming them, instead of failing at the
first step inside a matrix product; the unsharded rest of the model still trains with ``skip_layers``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[1] / "support" / "fsdp_guard_worker.py"


def test_fully_sharded_parameters_are_a_clear_error_and_skipping_them_trains_the_rest():
    pytest.importorskip("torch.distributed.device_mesh")
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=120)
    if "cannot import name 'fully_shard'" in proc.stderr:
        pytest.skip("this torch has no FSDP2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR: kfac: parameters ['0.weight', '0.bias'] are DTensor shards" in proc.stdout
    assert "LAYERS: ['2']" in proc.stdout
