"""Training script launched by ``torchrun`` in tests/test_torchrun.py: DDP + ``kfac.KFAC`` on gloo, with a
checkpoint written at the end and an optional resume from it (possibly at another world size)."""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac  # noqa: E402
import dist_workers as W  # the script's own folder is on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--strategy", default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    assert int(os.environ["LOCAL_RANK"]) == rank
    model = W.make_model()
    ddp = DDP(model)
    opt = kfac.KFAC(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), strategy=args.strategy,
                    **W.KFAC_KW)
    ckpt = args.out / "ckpt.pt"
    start = 0
    if args.resume:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = opt.preconditioner.steps
    W.train(ddp, opt, range(start, start + args.steps), rank, world)
    state = {"model": model.state_dict(), "opt": opt.consolidated_state_dict()}  # collective: every rank calls it
    if rank == 0:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt)
        torch.save([p.detach() for p in model.parameters()], args.out / f"params_world{world}.pt")
        (args.out / f"plan_world{world}.txt").write_text(opt.preconditioner.plan.summary())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
