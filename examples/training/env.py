"""The processes of a run: one process group under torchrun (NCCL with one GPU per local rank, else gloo), none
under plain ``python``; sums and object gathers that also work without a group."""

from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *a: Any) -> None:
        if self.main:
            print(*a, flush=True)


def setup(args: argparse.Namespace) -> Env:
    """Under torchrun (``WORLD_SIZE`` set): one process group (NCCL with one GPU per local rank, else gloo);
    under plain ``python``: one process, no process group."""
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if use_cuda:
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if args.threads:
        torch.set_num_threads(args.threads)
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        return Env(0, 1, 0, device, False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=args.dist_timeout),
                            **({"device_id": device} if use_cuda else {}))
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def teardown(env: Env) -> None:
    """Wait for every rank (rank 0 may still be writing the last checkpoint: a rank that destroys its gloo groups
    and exits while a peer is still connected can abort), then destroy the process groups."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(env: Env, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(env: Env, obj: Any) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out

