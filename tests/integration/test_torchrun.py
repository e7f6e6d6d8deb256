"""torchrun end to end: a DDP + K-FAC job launched with ``torchrun --standalone``, checkpointed at 2 processes and
resumed by a new torchrun launch at 3 processes, equals uninterrupted single-process training (float64)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_distributed import reference

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(300)]

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "torchrun_train.py"


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", str(SCRIPT), *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("strategy", ["dp-kfac", "comm-opt"])
def test_torchrun_checkpoint_at_2_resumes_at_3(strategy, tmp_path):
    torchrun(2, "--out", str(tmp_path), "--steps", "3", "--strategy", strategy)
    torchrun(3, "--out", str(tmp_path), "--steps", "3", "--strategy", strategy, "--resume")
    got = torch.load(tmp_path / "params_world3.pt")
    for g, w in zip(got, reference(steps=6)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert "strategy=" + strategy in (tmp_path / "plan_world3.txt").read_text()
