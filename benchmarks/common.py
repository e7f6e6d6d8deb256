"""Pieces the benchmark scripts share: the model, synthetic data, schedule arithmetic and machine information."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import kfac

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE = 32
NUM_CLASSES = 10


def build_model(quick: bool, seed: int) -> nn.Module:
    """``resnet18(num_classes=10)`` (or, for ``--quick``, a tiny conv net) with deterministic weights."""
    torch.manual_seed(seed)
    if quick:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        )
    import torchvision

    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def make_batches(n: int, batch: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """A pool of synthetic batches: inputs ~ N(0, 1), labels uniform (timing only)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, IMAGE, IMAGE, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g))
            for _ in range(n)]


def count_events(start: int, steps: int, every: int) -> int:
    """How many step indices ``s`` in ``[start, start + steps)`` satisfy ``s % every == 0``."""
    return (start + steps - 1) // every - (start - 1) // every  # floor division, also right for start == 0


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, cores, library versions, git commit (and whether kfac/ had local changes), date; plus ``extra``."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "kfac"], cwd=REPO_ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    return {
        "cpu_model": cpu, "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__, "torchvision": tv,
        "kfac": kfac.__version__, "git_commit": commit, "kfac_dir_dirty": dirty,
        "python": platform.python_version(), "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
