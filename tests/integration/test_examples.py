"""The torchrun ResNet examples (examples/torch_cifar10_resnet.py, examples/torch_imagenet_resnet.py) in tiny
configurations: a 2-process K-FAC run with TensorBoard scalars, a real kill (SIGKILL of the workers after a
checkpoint) resumed at another world size and equal to the uninterrupted run, the ImageNet example with EK-FAC and
M-FAC on synthetic data, and the plain SGD path."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(300)]
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CIFAR = EXAMPLES / "torch_cifar10_resnet.py"
IMAGENET = EXAMPLES / "torch_imagenet_resnet.py"
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 150

# Tiny CIFAR configuration on the offline digits data (1347 training images: 84 steps per epoch at batch 16).
# --norm group: BatchNorm normalises with per-process batch statistics, so a 2-process run is a different
# computation from a 1-process run on the same global batch (torch's SyncBatchNorm has no CPU kernels); GroupNorm
# is per example, which makes the run independent of the number of processes up to float32 rounding.
TINY = ["--model", "resnet8", "--width", "4", "--norm", "group", "--batch-size", "16", "--epochs", "1",
        "--warmup-epochs", "0.05", "--optimizer", "kfac", "--factor-update-steps", "1", "--inv-update-steps", "2",
        "--log-interval", "2", "--no-progress"]
STEPS = 8


def torchrun_cmd(nproc: int, script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", str(script), *args]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def final_metrics(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("final: ")]
    assert len(lines) == 1, stdout[-4000:]  # printed by rank 0 only
    metrics = json.loads(lines[0][len("final: "):])
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    return metrics


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("checkpoint-*.pt"))


def load_checkpoint(directory: Path, step: int) -> dict:
    return torch.load(directory / f"checkpoint-{step:08d}.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-process K-FAC run of STEPS steps, with TensorBoard logs and a final checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    stdout = run(torchrun_cmd(2, CIFAR, *TINY, "--max-steps", str(STEPS), "--checkpoint-dir", str(out / "ckpt"),
                              "--log-dir", str(out / "tb")))
    return out, stdout


def test_cifar_kfac_two_processes_tensorboard(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, stdout = reference
    assert "OFFLINE DEFAULT" in stdout and "scikit-learn digits" in stdout  # the data banner
    assert "2 process(es)" in stdout
    metrics = final_metrics(stdout)
    assert metrics["step"] == STEPS
    assert checkpoint_steps(out / "ckpt") == [STEPS]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/accuracy", "train/lr", "test/loss", "test/accuracy", "time/optimizer_step_ms",
                "time/forward_backward_ms", "kfac/bytes_communicated/factors", "kfac/bytes_communicated/total"}
    assert expected <= tags, sorted(tags)
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(2, STEPS + 1, 2))
    for tag in expected:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    assert acc.Scalars("kfac/bytes_communicated/factors")[-1].value > 0  # 2 ranks: factors are all-reduced
    lrs = [e.value for e in acc.Scalars("train/lr")]
    # linear warm-up over round(0.05 * 84) = 4 steps to the peak lr (logged: the lr of the next step)
    assert lrs == pytest.approx([0.075, 0.1, 0.1, 0.1])


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def _kill_after_checkpoint(cmd: list[str], ckpt_dir: Path, log: Path) -> bool:
    """Start ``cmd`` (torchrun), SIGKILL its workers as soon as a checkpoint file appears, reap everything.
    Returns whether the kill landed (False: the run completed first, which is fine for the caller)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    killed = False
    try:
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if ckpt_dir.is_dir() and checkpoint_steps(ckpt_dir):
                for pid in _children(proc.pid):  # the workers: torchrun starts each in its own session
                    os.kill(pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
        proc.wait(timeout=60)  # torchrun notices the dead workers, stops the others and exits non-zero
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 or killed, log.read_text()[-4000:]
    return killed and proc.returncode != 0


def test_cifar_kill_and_resume_at_other_world_size(reference, tmp_path):
    ref_dir, _ = reference
    ckpt = tmp_path / "ckpt"
    # 2 processes, a checkpoint every 2 steps, killed (SIGKILL, no clean-up) right after the first one is written
    # (if the kill lands late the run just reaches --max-steps 6 and ends with a final checkpoint)
    tb = tmp_path / "tb"
    _kill_after_checkpoint(torchrun_cmd(2, CIFAR, *TINY, "--max-steps", "6", "--checkpoint-every", "2",
                                        "--checkpoint-dir", str(ckpt), "--log-dir", str(tb)), ckpt,
                           tmp_path / "killed.log")
    saved = checkpoint_steps(ckpt)
    assert saved and set(saved) <= {2, 4, 6}, saved
    for step in saved:  # written atomically: whatever the kill interrupted, every checkpoint file is complete
        assert load_checkpoint(ckpt, step)["world_size"] == 2
    resume_step = saved[-1]

    # resumed by a new launch with 1 process, to the same end as the reference
    stdout = run(torchrun_cmd(1, CIFAR, *TINY, "--max-steps", str(STEPS), "--checkpoint-dir", str(ckpt),
                              "--log-dir", str(tb)))
    assert f"at step {resume_step} (epoch 0, batch {resume_step}; saved by 2 process(es), now 1)" in stdout, stdout
    assert final_metrics(stdout)["step"] == STEPS
    # TensorBoard: events the killed run logged after its checkpoint are purged, so each step appears once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2, STEPS + 1, 2))
    got, want = load_checkpoint(ckpt, STEPS), load_checkpoint(ref_dir / "ckpt", STEPS)
    assert got["step"] == want["step"] == STEPS and got["world_size"] == 1
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == STEPS
    assert got["optimizer"]["kfac"]["steps"] == want["optimizer"]["kfac"]["steps"] == STEPS
    # Same data per global step, same augmentation, same schedule, K-FAC state restored: the parameters equal the
    # uninterrupted 2-process run up to float32 rounding (the 1-process run sums the batch in another order than
    # DDP's average of two half-batch gradients and K-FAC's all-reduced factors), not bit for bit. The GroupNorm
    # layers' diagonal curvature amplifies that rounding a little (a few 1e-5 after 8 steps); in float64 two ranks
    # equal one process to 1e-15 (tests/integration/test_distributed.py).
    for name, w in want["model"].items():
        torch.testing.assert_close(got["model"][name], w, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("optimizer", ["ekfac", "mfac"])
def test_imagenet_synthetic_one_process(optimizer, tmp_path):
    stdout = run([sys.executable, str(IMAGENET), "--synthetic", "--image-size", "32", "--model", "resnet18",
                  "--num-classes", "10", "--synthetic-size", "64", "--batch-size", "8", "--max-steps", "2",
                  "--optimizer", optimizer, "--factor-update-steps", "1", "--inv-update-steps", "2",
                  "--num-grads", "2", "--log-interval", "1", "--no-progress", "--threads", "1",
                  "--log-dir", str(tmp_path / "tb")])
    assert "SYNTHETIC DATA (--synthetic)" in stdout and "accuracy is meaningless" in stdout
    assert final_metrics(stdout)["step"] == 2


def test_cifar_sgd_plain_python(tmp_path):
    stdout = run([sys.executable, str(CIFAR), "--model", "resnet8", "--width", "4", "--batch-size", "16",
                  "--max-steps", "3", "--epochs", "1", "--optimizer", "sgd", "--no-progress", "--threads", "1",
                  "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert "1 process(es) on cpu (gloo, no process group)" in stdout
    assert final_metrics(stdout)["step"] == 3
    state = load_checkpoint(tmp_path / "ckpt", 3)
    assert "kfac" not in state["optimizer"] and state["config"]["optimizer"] == "sgd"
