"""Worker functions for the distributed reliability tests (importable by spawned processes; see dist_workers)."""

from __future__ import annotations

import os
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac

from dist_workers import GLOBAL_BATCH, KFAC_KW, batch, make_model, train_allreduce

STEPS = 4


# -- models ----------------------------------------------------------------------------------------------------
class BranchNet(nn.Module):
    """``main(h)`` plus ``branch(h)`` on the rows in ``branch_rows`` (a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(2 * 5 * 5, 8)
        self.main = nn.Linear(8, 4)
        self.branch = nn.Linear(8, 4)
        self.double()

    def forward(self, x: torch.Tensor, branch_rows: slice | None) -> torch.Tensor:
        h = torch.tanh(self.trunk(x.flatten(1)))
        out = self.main(h)
        if branch_rows is None:
            return out
        extra = torch.zeros_like(out)
        extra[branch_rows] = self.branch(h[branch_rows])
        return out + extra


class SharedNet(nn.Module):
    """A layer applied twice per forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(2 * 5 * 5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        h = torch.tanh(self.shared(h))
        return self.head(torch.tanh(self.shared(h)))


def branch_rows(step: int, rank: int, world: int) -> slice | None:
    """Step 0: only rank 0's rows take the branch (rank 1 never calls it); later steps: every row."""
    per = GLOBAL_BATCH // world
    if step == 0:
        return slice(0, per) if rank == 0 else None
    return slice(0, per)


def reference_branch(strategy_free_kw: dict, steps: int = STEPS) -> list[torch.Tensor]:
    model = BranchNet()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **strategy_free_kw)
    per = GLOBAL_BATCH // 2
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        rows = slice(0, per) if step == 0 else slice(0, GLOBAL_BATCH)  # the global batch of the 2-rank run
        F.cross_entropy(model(x, rows), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


# -- scenarios -------------------------------------------------------------------------------------------------
def per_rank_branch(rank: int, world: int, out: Path, strategy: str) -> dict:
    """DDP(find_unused_parameters=True); the branch runs on rank 0 only at step 0: no hang, exact result."""
    model = BranchNet()
    ddp = DDP(model, find_unused_parameters=True)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy=strategy,
                    **{**KFAC_KW, "inv_update_steps": 1})
    per = GLOBAL_BATCH // world
    unused_after_first = None
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        F.cross_entropy(ddp(x, branch_rows(step, rank, world)), y).backward()
        opt.step()
        if step == 0:
            unused_after_first = opt.preconditioner.unused_layers
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out / f"branch_{strategy}.pt")
    return {"layers": opt.preconditioner.layers, "unused_after_first": unused_after_first,
            "unused": opt.preconditioner.unused_layers}


def shared_layer(rank: int, world: int, out: Path, strategy: str) -> dict:
    """A layer applied twice per forward, one layer per bucket (its bucket must wait for both uses)."""
    model = SharedNet()
    ddp = DDP(model)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy=strategy,
                    bucket_cap_mb=1e-6, **KFAC_KW)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(ddp(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out / f"shared_{strategy}.pt")
    return {"launched_early": opt.preconditioner.executor.reduction.launched_early}


def empty_rank(rank: int, world: int, out: Path, method: str) -> dict:
    """Rank 1 has 0 rows at step 1 (loss sum / nominal rows: it contributes nothing)."""
    model = make_model(pooled=True)
    ddp = DDP(model)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy="comm-opt",
                    method=method, **KFAC_KW)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        lo, hi = rank * per, (rank + 1) * per
        if step == 1 and rank == 1:
            hi = lo
        opt.zero_grad()
        (F.cross_entropy(ddp(x[lo:hi]), y[lo:hi], reduction="sum") / per).backward()
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out / f"empty_{method}.pt")
    return {"steps": opt.preconditioner.steps}


def ddp_variant(rank: int, world: int, out: Path, variant: str) -> dict:
    """DDP options K-FAC must work with: no_sync accumulation, gradient_as_bucket_view, find_unused_parameters."""
    model = make_model()
    ddp = DDP(model, gradient_as_bucket_view=variant == "bucket_view", find_unused_parameters=variant == "find_unused")
    micro = 2 if variant == "no_sync" else 1
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy="dp-kfac",
                    accumulation_steps=micro, **KFAC_KW)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        chunks = list(zip(x.chunk(micro), y.chunk(micro)))
        for i, (xc, yc) in enumerate(chunks):
            if i < micro - 1:
                with ddp.no_sync():
                    (F.cross_entropy(ddp(xc), yc) / micro).backward()
            else:
                (F.cross_entropy(ddp(xc), yc) / micro).backward()
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out / f"variant_{variant}.pt")
    return {"steps": opt.preconditioner.steps}



def rank0_save(rank: int, world: int, out: Path, strategy: str) -> dict:
    """``if rank == 0: torch.save(opt.state_dict(), path)``: no hang; then every rank tries to load rank 0's file
    and its own file."""
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy=strategy, **KFAC_KW)
    train_allreduce(model, opt, range(2), rank, world)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / f"rank0_{strategy}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / f"own_{strategy}_{rank}.pt")
    train_allreduce(model, opt, range(2, 3), rank, world)  # collectives still line up after the lone save
    dist.barrier()
    result: dict = {"shard": opt.state_dict()["kfac"]["shard"]}
    for what, path in (("rank0", out / f"rank0_{strategy}.pt"), ("own", out / f"own_{strategy}_{rank}.pt")):
        fresh = make_model()
        fresh_opt = kfac.KFAC(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9), strategy=strategy,
                              **KFAC_KW)
        state = torch.load(path, weights_only=False)
        try:
            fresh.load_state_dict(state["model"])
            fresh_opt.load_state_dict(state["opt"])
            result[what] = "ok"
        except ValueError as exc:
            result[what] = str(exc)
        loaded = torch.tensor([1 if result[what] == "ok" else 0])
        dist.all_reduce(loaded, op=dist.ReduceOp.MIN)  # train on only if every rank resumed
        if loaded.item():
            train_allreduce(fresh, fresh_opt, range(2, 3), rank, world)
            if rank == 0:
                torch.save([p.detach() for p in fresh.parameters()], out / f"resumed_{what}_{strategy}.pt")
        fresh_opt.preconditioner.remove()
        dist.barrier()
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out / f"uninterrupted_{strategy}.pt")
    return result


def mismatched_schedule(rank: int, world: int, out: Path) -> dict:
    """factor_update_steps differs on rank 1 from step 2 on: every rank raises a clear error before it bites."""
    model = make_model()
    fus = (lambda s: 1) if rank == 0 else (lambda s: 1 if s < 2 else 2)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="dp-kfac",
                    **{**KFAC_KW, "factor_update_steps": fus})
    try:
        train_allreduce(model, opt, range(STEPS), rank, world)
    except RuntimeError as exc:
        return {"error_message": str(exc), "steps": opt.preconditioner.steps}
    return {"error_message": None, "steps": opt.preconditioner.steps}


def mismatched_option(rank: int, world: int, out: Path, option: str) -> dict:
    model = make_model()
    values = {"damping": (1e-2, 2e-2), "kl_clip": (lambda s: 1e-2, lambda s: 1e-3), "comm_dtype": (None, torch.float32)}
    kw = {**KFAC_KW, option: values[option][min(rank, 1)]}
    try:
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="comm-opt", **kw)
    except RuntimeError as exc:
        return {"error_message": str(exc)}
    return {"error_message": None}


def nan_decomposition(rank: int, world: int, out: Path) -> dict:
    """dp-kfac: one layer's grad worker holds a NaN eigenvector; every rank falls back to the plain gradient for
    that layer (the same decision on every rank), parameters stay finite and identical."""
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="dp-kfac",
                    **{**KFAC_KW, "inv_update_steps": 100})
    train_allreduce(model, opt, range(1), rank, world)
    pre = opt.preconditioner
    victim = pre.layers[-1]
    if pre.plan.is_grad_worker(victim, rank):
        pre.store[victim].QA[0, 0] = float("nan")
    per = GLOBAL_BATCH // world
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    raw = [p.grad.clone() for p in model[-1].parameters()]
    opt.step()
    plain = all(torch.equal(p.grad, r) for p, r in zip(model[-1].parameters(), raw))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"fallbacks": pre.fallbacks, "victim": victim, "plain": plain, "finite": bool(torch.isfinite(flat).all()),
            "params": flat.tolist()}


def half_wire_overflow(rank: int, world: int, out: Path) -> dict:
    """float16 on the wire with activations whose factor entries exceed float16's range: the overflow is detected
    together, the wire widens, and the next update is exact."""
    model = nn.Linear(4, 2, bias=False).double()
    # inv_update_steps=100: only factors are under test (decompositions of such factors overflow float16 too)
    pre = kfac.KFACPreconditioner(model, strategy="comm-opt", comm_dtype=torch.float16, factor_decay=0.0,
                                  inv_update_steps=100,
                                  kl_clip=None, factor_dtype=torch.float64)
    got = []
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64) * 1e3
        model.zero_grad()
        model(x[rank * 4:(rank + 1) * 4]).sum().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        pre.step()
        got.append(None if pre.store[""].A is None else pre.store[""].A.tolist())
    return {"A": got, "discarded": pre.discarded_statistics}


def raise_mid_step(rank: int, world: int, out: Path) -> dict:
    """Rank 1 raises between backward and step() and its process exits; rank 0 must fail fast, not hang."""
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="dp-kfac", **KFAC_KW)
    train_allreduce(model, opt, range(1), rank, world)
    per = GLOBAL_BATCH // world
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
    if rank == 1:
        (out / f"rank{rank}.json").write_text(json.dumps({"raised": True}))
        os._exit(3)  # what an uncaught exception does to a torchrun worker
    start = time.monotonic()
    try:
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
    except Exception as exc:  # gloo reports the closed connection
        return {"elapsed": time.monotonic() - start, "error_message": f"{type(exc).__name__}: {exc}"}
    return {"elapsed": time.monotonic() - start, "error_message": None}
