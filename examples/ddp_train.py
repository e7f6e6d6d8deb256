"""DDP + K-FAC end to end: train, checkpoint, resume (offline: scikit-learn's digits, a small CNN with GroupNorm).

    torchrun --standalone --nproc-per-node=2 examples/ddp_train.py --steps 40 --save-every 20
    torchrun --standalone --nproc-per-node=2 examples/ddp_train.py --steps 60 --resume   # continues at step 40

Every rank takes its slice of the same global batch (seeded by the step, so a resumed run sees the batches the
uninterrupted one would). Every ``--save-every`` steps all ranks call ``opt.consolidated_state_dict()`` (a
collective: the complete K-FAC state, loadable at any world size) and rank 0 writes the checkpoint atomically
(model, optimizer with K-FAC's factors, step). ``--resume`` loads it on every rank, at this or another world size,
and goes on: the run equals the uninterrupted one. Runs as a single process too (``python examples/ddp_train.py``).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac
from _digits import load_data


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="train until this global step")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every this many steps (and at the end)")
    p.add_argument("--checkpoint", type=Path, default=Path("runs/ddp_train/checkpoint.pt"), help="checkpoint file")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    return p.parse_args()


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


def save(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    data = load_data()
    model = make_model(args.seed)
    net: nn.Module = DDP(model) if distributed else model
    opt = kfac.KFAC(net, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))
    start = 0
    if args.resume:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start} (saved by {ckpt['world_size']} process(es), "
                  f"now {world})", flush=True)
    local = args.batch_size // world
    for step in range(start, args.steps):
        order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(args.seed * 100003 + step))
        idx = order[:args.batch_size][rank * local:(rank + 1) * local]
        opt.zero_grad()
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        done = step + 1
        if done % args.save_every == 0 or done == args.steps:
            state = opt.consolidated_state_dict()  # every rank: a collective
            if rank == 0:
                save(args.checkpoint, {"model": model.state_dict(), "opt": state, "step": done, "world_size": world})
        if rank == 0 and (done % 10 == 0 or done == args.steps):
            with torch.no_grad():
                test = F.cross_entropy(model(data.x_test), data.y_test).item()
            print(f"step {done:4d}  batch loss {loss.item():.6f}  test loss {test:.6f}", flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
