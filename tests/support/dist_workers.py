"""Worker functions for the distributed tests (importable by spawned processes)."""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import kfac

GLOBAL_BATCH = 12
STEPS = 5


def make_model(hidden: int = 8, pooled: bool = False) -> nn.Module:
    """Conv -> Linear -> Linear; ``pooled`` averages the conv output to 2x2 first, so that every factor has
    (nearly) full rank after one batch (EK-FAC's corrections are only unique up to rotations inside degenerate
    eigenspaces, such as the never-seen null space of a 76-dimensional A after 12 examples)."""
    torch.manual_seed(0)
    body = [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4, hidden)] if pooled else [
        nn.Flatten(), nn.Linear(3 * 5 * 5, hidden)]
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), *body, nn.Tanh(), nn.Linear(hidden, 4)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (GLOBAL_BATCH,),
                                                                                              generator=g)


KFAC_KW = dict(factor_update_steps=1, inv_update_steps=2, damping=0.01, factor_decay=0.8, kl_clip=1e-2,
               factor_dtype=torch.float64)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def launch(fn, world: int, out_dir: Path, *args, timeout: float = 120.0) -> list[dict]:
    """Run ``fn(rank, world, out_dir, *args)`` on ``world`` gloo processes; return each rank's JSON result.
    Raises if any rank fails or the deadline passes (processes are killed: a test never hangs)."""
    import uuid
    store = out_dir / f"pg_store_{uuid.uuid4().hex}"  # a FileStore file must be fresh for each process group
    ctx = mp.start_processes(_entry, args=(fn, world, str(out_dir), str(store), args), nprocs=world, join=False,
                             start_method="spawn")
    import time
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout}s")
    except mp.ProcessExitedException:
        # gloo occasionally aborts while tearing down a process group (after the barrier, in C++ destructors);
        # results are written before teardown, so a crash is only tolerated once every rank has reported
        if not all((out_dir / f"rank{r}.json").exists() for r in range(world)):
            raise
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        data = json.loads((out_dir / f"rank{r}.json").read_text())
        if "error" in data:
            raise RuntimeError(f"rank {r} failed:\n{data['error']}")
        results.append(data)
    return results


def _entry(rank: int, fn, world: int, out_dir: str, store: str, args: tuple) -> None:
    out = Path(out_dir)
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, out, *args)
    except Exception:
        result = {"error": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    try:  # orderly teardown: nobody leaves while a peer still talks to it
        dist.barrier()
    except RuntimeError as exc:
        # the result is already on disk; a peer that tore its sockets down a moment early (gloo does, rarely, once
        # its own barrier has completed) must not turn a finished run into a failure
        print(f"rank {rank}: teardown barrier failed after the result was written: {exc}", file=sys.stderr)
    finally:
        dist.destroy_process_group()


# -- scenarios -------------------------------------------------------------------------------------------------
def equivalence(rank: int, world: int, out: Path, configs: list[dict]) -> dict:
    """Train a DDP model with each config; save final parameters (rank 0) and per-rank bytes/memory."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    report = {}
    for i, cfg in enumerate(configs):
        cfg = dict(cfg)
        model = make_model(pooled=cfg.pop("pooled", False))
        ddp = DDP(model)
        opt = kfac.KFAC(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), **{**KFAC_KW, **cfg})
        train(ddp, opt, range(STEPS), rank, world)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out / f"params{i}.pt")
        report[str(i)] = {"strategy": opt.preconditioner.plan.strategy,
                          "bytes": {k: float(v) for k, v in opt.preconditioner.communicator.bytes_sent.items()},
                          "plan_comm": opt.preconditioner.plan.comm.to_dict(),
                          "split": opt.preconditioner.plan.split,
                          "launched_early": opt.preconditioner.executor.reduction.launched_early,
                          "memory": opt.preconditioner.memory_usage()}
    return report


def non_finite_on_one_rank(rank: int, world: int, out: Path) -> dict:
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="dp-kfac", **KFAC_KW)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():  # no DDP here: ranks see different gradients; only rank 1's are broken
        dist.all_reduce(p.grad)
    if rank == 1:
        model[0].weight.grad[0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return {"skipped": opt.preconditioner.skipped_steps, "steps": opt.preconditioner.steps, "unchanged": unchanged}


def mismatched_models(rank: int, world: int, out: Path) -> dict:
    model = make_model(hidden=8 if rank == 0 else 9)
    try:
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="comm-opt")
    except RuntimeError as exc:
        return {"error_message": str(exc)}
    return {"error_message": None}


def ekfac_dp_kfac(rank: int, world: int, out: Path) -> dict:
    """EK-FAC under dp-kfac is refused; the failed constructor leaves no hook behind, so the model then takes a
    comm-opt EK-FAC."""
    model = make_model()
    try:
        kfac.EKFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="dp-kfac")
        message = ""
    except ValueError as exc:
        message = str(exc)
    opt = kfac.EKFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="comm-opt")
    return {"error_message": message, "rebuilt": opt.preconditioner.layers}


def checkpoint(rank: int, world: int, out: Path, phase: str, steps: int, strategy: str) -> dict:
    """phase 'save': train `steps` steps, save model + optimizer state; 'resume': load it and train on."""
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), strategy=strategy, **KFAC_KW)
    if phase == "save":
        train_allreduce(model, opt, range(steps), rank, world)
        state = {"model": model.state_dict(), "opt": opt.consolidated_state_dict()}  # collective: every rank calls it
        if rank == 0:
            torch.save(state, out / "ckpt.pt")
    else:
        state = torch.load(out / "ckpt.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = opt.preconditioner.steps
        train_allreduce(model, opt, range(start, start + steps), rank, world)
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out / "resumed.pt")
    return {"memory": opt.preconditioner.memory_usage()}


def train_allreduce(model, opt, steps, rank, world):
    """Like DDP: average gradients over ranks by hand (the model stays un-wrapped, so layer names match)."""
    per = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()


def local_reduction(rank: int, world: int, out: Path) -> dict:
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy="dp-kfac",
                    factor_reduction="local", **{**KFAC_KW, "factor_decay": 0.0})
    train_allreduce(model, opt, range(1), rank, world)
    torch.save({n: (e.A, e.G) for n, e in opt.store.items()}, out / f"local_rank{rank}.pt")
    return {"factor_bytes": opt.preconditioner.bytes_communicated.get("factors", 0)}


def half_precision_wire(rank: int, world: int, out: Path, rows: int) -> dict:
    """More rows than float16 can count (65504): factors must still be right with float16 on the wire."""
    model = nn.Linear(4, 2, bias=False).double()
    pre = kfac.KFACPreconditioner(model, strategy="comm-opt", comm_dtype=torch.float16, factor_decay=0.0,
                                  kl_clip=None, factor_dtype=torch.float64)
    x = torch.full((rows, 4), 0.5, dtype=torch.float64)
    model(x).sum().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    pre.step()
    return {"A": pre.store[""].A.tolist(), "G": pre.store[""].G.tolist()}


UNEVEN = [(5, 7), (4, 6), (5, 2), (1, 11)]  # per-rank rows at each step (world 2): the global count changes too


def uneven_batches(rank: int, world: int, out: Path, strategy: str) -> dict:
    """Ranks see different numbers of rows, and the global count changes between steps; save each step's batch
    factors (factor_decay=0) for the layers this rank holds."""
    model = make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.0), strategy=strategy,
                    **{**KFAC_KW, "factor_decay": 0.0, "kl_clip": None}, bucket_cap_mb=1e-4)
    held = []
    for step, sizes in enumerate(UNEVEN):
        x, y = batch(step)
        lo = sum(sizes[:rank])
        opt.zero_grad()
        F.cross_entropy(model(x[lo:lo + sizes[rank]]), y[lo:lo + sizes[rank]]).backward()
        opt.step()
        held.append({n: (e.A, e.G) for n, e in opt.store.items()})
    torch.save(held, out / f"uneven_rank{rank}.pt")
    return {"launched_early": opt.preconditioner.executor.reduction.launched_early,
            "buckets": len(opt.preconditioner.executor.reduction.buckets)}


def influence(rank: int, world: int, out: Path, method: str) -> dict:
    """Fit and score on `world` ranks (batch i on rank i % world); rank 0 saves the scores."""
    from kfac.influence import ClassificationTask, InfluenceAnalyzer

    model, train, queries = influence_problem()
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False, num_grads=10)
    an.fit(train)
    scores = an.pairwise_scores(queries, train)
    self_scores = an.self_scores(train)
    if rank == 0:
        torch.save({"scores": scores, "self": self_scores}, out / f"influence_{method}.pt")
    return {"bytes": an.bytes_communicated}


def influence_cg(rank: int, world: int, out: Path) -> dict:
    """EK-FAC-preconditioned CG on the Gauss-Newton matrix on `world` ranks: the products' batches are split over
    ranks."""
    from kfac.influence import ClassificationTask, InfluenceAnalyzer

    model, train, queries = influence_problem()
    an = InfluenceAnalyzer(model, ClassificationTask(), factor_dtype=torch.float64, score_dtype=torch.float64,
                           progress=False, solver="ggn", damping=0.5, solver_iterations=60, solver_tolerance=1e-13)
    scores = an.fit(train).pairwise_scores(queries, train)
    if rank == 0:
        torch.save({"scores": scores, "iterations": an.solver_info["iterations"]}, out / "influence_cg.pt")
    return {"bytes": an.bytes_communicated}


def influence_problem():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)  # initialised in float64 whatever the default dtype of the caller
    model = nn.Sequential(nn.Linear(4, 6, **f64), nn.Tanh(), nn.Linear(6, 3, **f64))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(35, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (35,), generator=g)
    train = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 35, 6)]  # 6 batches, the last one short
    return model, train, [(x[:5], y[:5])]


def adaptive(rank: int, world: int, out: Path, strategy: str, fisher: str = "empirical") -> dict:
    """Adaptive K-FAC under DDP: the quadratic model's scalars are averaged over ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from kfac.adaptive.controller import AdaptiveConfig

    model = make_model(pooled=True)
    ddp = DDP(model)
    opt = kfac.KFAC(ddp, torch.optim.SGD(ddp.parameters(), lr=1.0), adaptive=AdaptiveConfig(adapt_every=2),
                    factor_dtype=torch.float64, strategy=strategy, fisher=fisher)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.step(lambda: F.cross_entropy(ddp(x), y))
    if rank == 0:
        torch.save([p.detach() for p in model.parameters()], out / f"adaptive_{strategy}.pt")
    return {"damping": opt.adaptive.damping,
            "params": [p.detach().flatten().tolist() for p in model.parameters()]}


class AttentionNet(nn.Module):
    """A transformer block on the (2, 5, 5) batches read as 5 tokens of 10 features: MHA in/out projections, the
    feed-forward Linears and the head are tracked; LayerNorms are not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(d_model=10, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        tokens = x.permute(0, 3, 1, 2).reshape(x.shape[0], 5, 10)
        return self.head(self.encoder(tokens).mean(1))


def group_norm_net() -> nn.Module:
    """Conv -> GroupNorm (diagonal curvature from per-example gradients, in A) -> Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(100, 4)).double()


class TiedNet(nn.Module):
    """Tokens from the signs of the (2, 5, 5) batches (25 tokens over a vocabulary of 4) -> an embedding whose
    matrix the 4-class head reuses (tied weights: both uses' curvature, a factor power of 1 each)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(4, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        ids = ((x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()).flatten(1)
        return self.head(torch.tanh(self.mid(self.emb(ids))).mean(1))


NETS = {"transformer": lambda: AttentionNet().double(), "group_norm": group_norm_net,
        "tied": lambda: TiedNet().double()}


def make_kfac(model: nn.Module, **kwargs) -> kfac.KFAC:
    """K-FAC around SGD with momentum at KFAC_KW (the modules it leaves out are listed, not warned about)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **KFAC_KW, **kwargs)


def replica_training(rank: int, world: int, out: Path, strategy: str, warm: bool) -> dict:
    """K-FAC (``warm``: with warm-started eigenbasis refreshes): this rank's parameters after training."""
    model = make_model(pooled=True)
    opt = make_kfac(model, strategy=strategy, warm_start=warm)
    train_allreduce(model, opt, range(STEPS), rank, world)
    return {"params": [p.detach().flatten().tolist() for p in model.parameters()]}


def net_training(rank: int, world: int, out: Path, net: str, strategy: str) -> dict:
    """K-FAC on ``NETS[net]`` with gradients averaged over ranks: its tracked layers and parameters after training."""
    model = NETS[net]()
    opt = make_kfac(model, strategy=strategy)
    train_allreduce(model, opt, range(STEPS), rank, world)
    return {"params": [p.detach().flatten().tolist() for p in model.parameters()], "layers": opt.preconditioner.layers}
