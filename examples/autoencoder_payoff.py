"""The digits deep autoencoder (64-128-64-32-8-32-64-128-64, tanh, Bernoulli loss) trained by SGD, AdamW, Muon or
adaptive K-FAC, in one process or under torchrun (DDP; each rank takes its slice of the same global batch).

SGD (momentum 0.9), AdamW and Muon (AdamW on the biases) use the learning rates ``benchmarks/cpu/time_to_result.py``
tuned on its tuning seed (3.0, 0.01 and 0.03); adaptive K-FAC (``kfac.KFAC(..., adaptive=True)``) has nothing to tune. Rank 0 evaluates the
full-data loss every ``--eval-every`` steps and writes ``--out`` (JSON: the curve, training seconds per step)::

    torchrun --standalone --nproc-per-node=2 examples/autoencoder_payoff.py --optimizer adaptive --out ae.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.adaptive.controller import AdaptiveConfig

DIMS = [64, 128, 64, 32, 8, 32, 64, 128, 64]
TUNED_LR = {"sgd": 3.0, "adamw": 0.01, "muon": 0.03}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--optimizer", choices=("sgd", "adamw", "muon", "adaptive"), required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    torch.manual_seed(args.seed)
    layers: list[nn.Module] = []
    for a, b in zip(DIMS[:-1], DIMS[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    adaptive: kfac.KFAC | None = None
    opts: list[torch.optim.Optimizer] = []
    if args.optimizer == "sgd":
        opts = [torch.optim.SGD(net.parameters(), lr=TUNED_LR["sgd"], momentum=0.9)]
    elif args.optimizer == "adamw":
        opts = [torch.optim.AdamW(net.parameters(), lr=TUNED_LR["adamw"], weight_decay=0.0)]
    elif args.optimizer == "muon":  # on the weight matrices, AdamW on the biases (as Muon's docs recommend)
        opts = [torch.optim.Muon([p for p in net.parameters() if p.dim() == 2], lr=TUNED_LR["muon"]),
                torch.optim.AdamW([p for p in net.parameters() if p.dim() != 2], lr=1e-3, weight_decay=0.0)]
    else:
        adaptive = kfac.KFAC(net, torch.optim.SGD(net.parameters(), lr=1.0), adaptive=AdaptiveConfig(loss="bernoulli"))
    per = args.batch_size // world
    g = torch.Generator().manual_seed(args.seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(model(x), x))

    curve, elapsed = [(0, full_loss())], 0.0
    for step in range(1, args.steps + 1):
        xb = x[torch.randint(0, len(x), (args.batch_size,), generator=g)][rank * per:(rank + 1) * per]
        start = time.perf_counter()
        if adaptive is not None:
            adaptive.step(lambda: F.binary_cross_entropy_with_logits(net(xb), xb))
        else:
            for opt in opts:
                opt.zero_grad()
            F.binary_cross_entropy_with_logits(net(xb), xb).backward()
            for opt in opts:
                opt.step()
        elapsed += time.perf_counter() - start
        if step % args.eval_every == 0:
            curve.append((step, full_loss()))
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"optimizer": args.optimizer, "world_size": world, "steps": args.steps,
                                        "batch_size": args.batch_size, "curve": curve,
                                        "seconds_per_step": elapsed / args.steps}) + "\n")
        print(f"final: {args.optimizer} loss {curve[-1][1]:.4f} after {args.steps} steps", flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
