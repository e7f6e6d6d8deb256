"""examples/ddp_train.py: DDP + K-FAC trained for 40 steps equals 20 steps, a checkpoint, and a resumed run (2
torchrun processes, the same numbers to the printed digits), and the same checkpoint resumed by one process reaches
the same test losses (the gradient averaging order differs, so to 1e-4)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_train.py"


def run(tmp: Path, *args: str, nproc: int = 2) -> dict[int, tuple[float, float]]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0"] if nproc > 1 else [sys.executable])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, str(EXAMPLE), "--checkpoint", str(tmp / "ckpt.pt"), *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {int(s): (float(b), float(t)) for s, b, t in
            re.findall(r"step\s+(\d+)\s+batch loss ([\d.]+)\s+test loss ([\d.]+)", proc.stdout)}


def test_checkpoint_and_resume_equal_the_uninterrupted_run(tmp_path):
    for folder in ("full", "split", "one"):
        (tmp_path / folder).mkdir()
    full = run(tmp_path / "full", "--steps", "40")
    first = run(tmp_path / "split", "--steps", "20")
    saved_at_20 = (tmp_path / "split" / "ckpt.pt").read_bytes()
    resumed = run(tmp_path / "split", "--steps", "40", "--resume")
    assert sorted(full) == [10, 20, 30, 40] and sorted(resumed) == [30, 40]
    assert {**first, **resumed} == full
    (tmp_path / "one" / "ckpt.pt").write_bytes(saved_at_20)  # the 2-process checkpoint, resumed by one process
    alone = run(tmp_path / "one", "--steps", "40", "--resume", nproc=1)
    for step in (30, 40):
        assert abs(alone[step][1] - full[step][1]) <= 1e-4 * max(1.0, full[step][1]), (step, alone, full)
