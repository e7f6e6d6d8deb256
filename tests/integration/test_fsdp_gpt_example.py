"""examples/fsdp_gpt.py (FSDP2 + K-FAC on a small GPT, DCP checkpoint, influence on the sharded model), --quick
with 2 torchrun processes: the loss falls, the influence query prints its top sequences, the DCP checkpoint is
written; 20 steps straight through print the same losses as 10 steps + checkpoint + resume to 20, and one process
resuming the 2-process checkpoint reaches them too (to 2e-4: a different reduction order). Without FSDP2 the
example exits with a one-line error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp_gpt.py"


def _have_fsdp2() -> bool:
    if not dist.is_available():
        return False
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # noqa: F401
        except ImportError:
            return False
    return True


pytestmark = pytest.mark.skipif(not _have_fsdp2(), reason="needs FSDP2 (torch >= 2.4 with torch.distributed)")


def run(folder: Path, *args: str, nproc: int = 2) -> tuple[str, dict[int, float]]:
    """The example's stdout and its printed losses by step (checkpoint: ``folder``/ckpt)."""
    folder.mkdir(exist_ok=True)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0"] if nproc > 1 else [sys.executable])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, str(EXAMPLE), "--quick", "--checkpoint", str(folder / "ckpt"), *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = {int(s): float(x) for s, x in re.findall(r"^step\s+(\d+)\s+loss ([\d.]+)$", proc.stdout, re.M)}
    return proc.stdout, losses


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, str, dict[int, float]]:
    folder = tmp_path_factory.mktemp("fsdp_gpt") / "full"
    return (folder, *run(folder))


def test_quick_run_trains_checkpoints_and_answers_the_influence_query(straight):
    folder, out, losses = straight
    assert "2 process(es)" in out and "FSDP2 + K-FAC" in out
    assert sorted(losses) == [5, 10, 15, 20] and losses[20] < losses[5], losses
    assert (folder / "ckpt" / ".metadata").is_file() and list((folder / "ckpt").glob("*.distcp"))
    assert not (folder / "ckpt.tmp").exists() and not (folder / "ckpt.old").exists()
    influence = out[out.index("\ninfluence (EK-FAC on 32 training sequences"):]
    assert "top 3 supporting training sequences" in influence
    assert len(re.findall(r"^  #\s*\d+\s+\S+  '.*'$", influence, re.M)) == 3, influence


def test_checkpoint_and_resume_equal_the_straight_run(straight, tmp_path):
    _, _, full = straight
    _, first = run(tmp_path / "split", "--steps", "10")
    shutil.copytree(tmp_path / "split" / "ckpt", tmp_path / "one" / "ckpt")  # saved at step 10 by 2 processes
    out, resumed = run(tmp_path / "split", "--steps", "20", "--resume")
    assert "resumed from" in out and "at step 10 (saved by 2 process(es), now 2)" in out
    assert sorted(first) == [5, 10] and sorted(resumed) == [15, 20], (first, resumed)
    assert {**first, **resumed} == full
    out, alone = run(tmp_path / "one", "--steps", "20", "--resume", nproc=1)
    assert "saved by 2 process(es), now 1" in out and sorted(alone) == [15, 20]
    for step in (15, 20):
        assert abs(alone[step] - full[step]) <= 2e-4, (step, alone, full)


def test_without_fsdp2_a_one_line_error(tmp_path):
    hide = ("import runpy, sys, torch.distributed.fsdp as f; del f.fully_shard; "
            "sys.modules['torch.distributed._composable.fsdp'] = None; "
            f"sys.path.insert(0, {str(EXAMPLE.parent)!r}); sys.argv = ['fsdp_gpt.py', '--quick']; "
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("fsdp_gpt.py: FSDP2 (fully_shard) needs torch >= 2.4 built with torch.distributed; "
                           f"this is torch {torch.__version__}\n"), proc.stderr
