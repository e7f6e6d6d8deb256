"""What the distributed benchmark counts beside the library's own byte counters: the DDP gradient all-reduce
(a counting communication hook) and the CPU time of the whole machine (``/proc/stat``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor


def system_busy_seconds() -> float | None:
    """CPU seconds all cores of this machine spent busy since boot (``/proc/stat``), or ``None`` off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ByteCounter:
    """State of the counting DDP comm hook: this rank's share of the all-reduce wire volume (ring convention)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.bytes = 0.0
        self.buckets = 0


def counting_allreduce_hook(state: ByteCounter, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's stock ``allreduce_hook`` (mean over ranks), counting ``2 (N-1)/N`` bucket payloads per rank."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size() * 2 * (state.world_size - 1) / state.world_size
    state.buckets += 1
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


# DDP checks a hook's annotations by identity; with postponed (string) annotations it would reject this one.
counting_allreduce_hook.__annotations__.update(state=ByteCounter, bucket=dist.GradBucket,
                                               **{"return": torch.futures.Future[Tensor]})

