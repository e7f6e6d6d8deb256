"""Spawned-process functions for the distributed M-FAC tests (run through ``dist_workers.launch``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kfac

GLOBAL_BATCH = 12
STEPS = 5  # > NUM_GRADS: the window wraps
RESUME_AT = 3
NUM_GRADS = 3
MFAC_KW = {"num_grads": NUM_GRADS, "damping": 0.05, "kl_clip": 1e-2}
LR = 0.1


class Net(nn.Module):
    """Conv2d, LayerNorm (no K-FAC adapter: a flat block) and two Linear layers, all with biases: 4 blocks."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm(3 * 4 * 4)
        self.fc1 = nn.Linear(3 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.norm(torch.relu(self.conv(x)).flatten(1)))))


def make_model(hidden: int = 8) -> Net:
    torch.manual_seed(0)
    model = Net(hidden).double()
    with torch.no_grad():  # a non-trivial LayerNorm affine map
        model.norm.weight.add_(0.1 * torch.randn_like(model.norm.weight))
        model.norm.bias.add_(0.1 * torch.randn_like(model.norm.bias))
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return (torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))


def make_optimizer(model: nn.Module, params, mode: str, group=None) -> kfac.MFAC:
    return kfac.MFAC(model, torch.optim.SGD(params, lr=LR, momentum=0.9), blocks=mode, process_group=group,
                     **MFAC_KW)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1,
          after_step=None) -> None:
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        opt.step()
        if after_step is not None:
            after_step()


def probe_vector(pre: kfac.MFACPreconditioner) -> torch.Tensor:
    total = sum(torch.Size(s).numel() for s in pre.block_shapes().values())
    return torch.randn(total, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def tiny_model() -> nn.Module:
    """Two blocks: with three ranks, one rank holds no block (it still takes part in every collective)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def tiny_train(model: nn.Module, opt: torch.optim.Optimizer, rank: int = 0, world: int = 1) -> None:
    per = GLOBAL_BATCH // world
    for step in range(4):
        g = torch.Generator().manual_seed(3000 + step)
        x, y = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64), torch.randn(GLOBAL_BATCH, 2, generator=g,
                                                                                            dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        opt.step()


def make_tiny_optimizer(model: nn.Module, params, group=None) -> kfac.MFAC:
    return kfac.MFAC(model, torch.optim.SGD(params, lr=LR), num_grads=2, damping=0.1, process_group=group)


def scenario(rank: int, world: int, out: Path, modes: list[str], worlds: list[int]) -> dict:
    """One launch of ``world`` processes covers several world sizes: ranks ``0..n-1`` of each ``n`` in ``worlds``
    run :func:`run_world` on a process group of their own (``process_group=``), the others wait. First, ranks
    that build different models must all get a clear error.

    Pass the full world first: the communicators' private groups are created by their members only
    (``use_local_synchronization``), which advances torch's group counter on those ranks only, so an all-rank
    group created after a subgroup-only one would get different names on different ranks."""
    report: dict = {}
    model = make_model(hidden=8 if rank == 0 else 9)
    try:
        kfac.MFAC(model, torch.optim.SGD(model.parameters(), lr=LR), **MFAC_KW)
        report["mismatch_error"] = None
    except RuntimeError as exc:
        report["mismatch_error"] = str(exc)
    assert worlds == sorted(worlds, reverse=True), worlds
    for n in worlds:
        group = dist.new_group(list(range(n))) if n < world else None  # every rank takes part in new_group
        if rank < n:
            report[str(n)] = run_world(rank, n, out, modes, group)
        dist.barrier()
    return report


def run_world(rank: int, world: int, out: Path, modes: list[str], group) -> dict:
    """For each mode: train a DDP model with M-FAC (per-step bytes recorded), then query state_dict/ihvp/diag
    (collectives); then resume the single-process reference checkpoint at this world size and train on. Last, a
    two-block model (with three ranks, one holds no block)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    report: dict = {}
    for mode in modes:
        model = make_model()
        ddp = DDP(model, process_group=group)
        opt = make_optimizer(ddp, ddp.parameters(), mode, group)
        pre = opt.preconditioner
        mfac_bytes: list[float] = []
        grad_bytes: list[float] = []

        def record(pre=pre, mfac_bytes=mfac_bytes, grad_bytes=grad_bytes) -> None:
            mfac_bytes.append(pre.communicator.bytes_sent["mfac"])
            grad_bytes.append(pre.communicator.bytes_sent["gradients"])

        train(ddp, opt, range(STEPS), rank, world, after_step=record)
        state = pre.consolidated_state_dict()  # collective: complete on every rank
        v = probe_vector(pre)
        ihvp = pre.ihvp(v)
        diag = pre.diag()
        torch.save({"params": [p.detach() for p in model.parameters()], "state": state, "ihvp": ihvp, "diag": diag},
                   out / f"w{world}_{mode}_rank{rank}.pt")
        report[mode] = {"mfac_bytes": mfac_bytes, "grad_bytes": grad_bytes, "owners": pre.owners,
                        "held": [b.name for b in pre._owned], "public_bytes": pre.bytes_communicated,
                        "dim": sum(torch.Size(s).numel() for s in pre.block_shapes().values())}

        # resume the single-process checkpoint (saved at RESUME_AT) at this world size; the preconditioner is
        # built on the inner module so that block names match the single-process ones
        ckpt = torch.load(out / f"{mode}_ckpt.pt", weights_only=False)
        model = make_model()
        model.load_state_dict(ckpt["model"])
        ddp = DDP(model, process_group=group)
        opt = make_optimizer(model, ddp.parameters(), mode, group)
        opt.load_state_dict(ckpt["opt"])
        assert opt.preconditioner.steps == RESUME_AT
        train(ddp, opt, range(RESUME_AT, STEPS), rank, world)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out / f"w{world}_{mode}_resumed.pt")

    model = tiny_model()
    ddp = DDP(model, process_group=group)
    opt = make_tiny_optimizer(model, ddp.parameters(), group)
    tiny_train(ddp, opt, rank, world)
    report["tiny_held"] = [b.name for b in opt.preconditioner._owned]
    if rank == world - 1:
        torch.save([p.detach() for p in model.parameters()], out / f"w{world}_tiny.pt")
    return report
