"""TensorBoard scalars on rank 0 (``--log-dir``), and K-FAC's communication and memory as scalars."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from training.checkpoint import jsonable
from training.env import Env, gather_objects


class Logger:
    """TensorBoard scalars on rank 0 (``--log-dir``), optional."""

    def __init__(self, args: argparse.Namespace, env: Env, start_step: int) -> None:
        self.writer = None
        if args.log_dir is not None and env.main:
            from torch.utils.tensorboard import SummaryWriter

            # a killed run may have logged past its last checkpoint: on resume, drop its events after that step
            self.writer = SummaryWriter(str(args.log_dir), purge_step=start_step + 1 if start_step else None)
            if not start_step:
                self.writer.add_text("config", "```\n" + json.dumps(jsonable(vars(args)), indent=1) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()



def comm_scalars(env: Env, opt: torch.optim.Optimizer) -> dict[str, float]:
    """``bytes_communicated`` by category, summed over ranks (total traffic since this process started), plus
    the preconditioner's memory and skipped steps. Collective in a distributed run."""
    pre = getattr(opt, "preconditioner", None)
    if pre is None:
        return {}
    total: Counter[str] = Counter()
    for part in gather_objects(env, dict(pre.bytes_communicated)):
        total.update(part)
    out = {f"kfac/bytes_communicated/{k}": float(v) for k, v in sorted(total.items())}
    out["kfac/bytes_communicated/total"] = float(sum(total.values()))
    out["kfac/memory_MiB"] = pre.memory_usage() / 2**20
    out["kfac/skipped_steps"] = float(pre.skipped_steps)
    return out


