"""FSDP2 / HSDP scenarios for tests/integration/test_fsdp.py (importable by spawned processes, run by
:func:`dist_workers.launch`): the same models, batches and options as the single-process reference."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kfac

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh

GLOBAL_BATCH = 16  # every factor of full rank after one batch: EK-FAC's corrections are unique
STEPS = 5
KFAC_KW = dict(factor_update_steps=1, inv_update_steps=2, damping=0.01, factor_decay=0.8, kl_clip=1e-2,
               factor_dtype=torch.float64, step_timeout=60)


class Block(nn.Module):
    """Linear embedding -> one transformer encoder layer (attention, LayerNorms, MLP) -> mean over tokens ->
    head; ``seq_first`` runs the layer on ``(T, N, E)``. Its own inputs are batch-first (declared, as K-FAC reads a
    container's layout)."""

    batch_first = True

    def __init__(self, seq_first: bool = False) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=not seq_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.layer(h.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.layer(h)
        return self.head(h.mean(1))


class TinyLM(nn.Module):
    """Token embedding -> one encoder layer (``seq_first``: run on ``(T, N, E)``) -> per-position head: logits
    ``(N, T, V)`` for :class:`kfac.influence.CausalLMTask` (every tracked layer sees every position)."""

    batch_first = True

    def __init__(self, seq_first: bool = False, vocab: int = 11) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.embed = nn.Embedding(vocab, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=not seq_first)
        self.head = nn.Linear(16, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.layer(h.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.layer(h)
        return self.head(h)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind.startswith("lm"):
        return TinyLM(seq_first=kind == "lm-seq-first").double()
    if kind == "cnn":  # convolutions with GroupNorm (diagonal blocks), each module its own FSDP unit
        return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2),
                             nn.GroupNorm(1, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(5, 3)).double()  # every A of full rank: EK-FAC unique
    if kind == "mlp":  # odd widths: uneven shards, a layer with fewer rows than ranks
        model: nn.Module = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 7), nn.Tanh(), nn.Linear(7, 3))
    else:
        model = Block(seq_first=kind == "block-seq-first")
    return model.double()


def batch(step: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    shape = {"mlp": (GLOBAL_BATCH, 6), "cnn": (GLOBAL_BATCH, 2, 5, 5)}.get(kind, (GLOBAL_BATCH, 5, 6))
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    wrapper = {"ekfac": kfac.EKFAC}.get(cfg.pop("wrapper", ""), kfac.KFAC)
    return wrapper(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **{**KFAC_KW, **cfg})


def train(model: nn.Module, opt: torch.optim.Optimizer, kind: str, rank: int = 0, world: int = 1,
          steps: int = STEPS, start: int = 0) -> list[float]:
    """Steps ``start .. steps - 1`` on this rank's slice of each global batch (in the parameters' dtype); the
    losses."""
    per, dtype, losses = GLOBAL_BATCH // world, next(model.parameters()).dtype, []
    for step in range(start, steps):
        x, y = batch(step, kind)
        x, y = x[rank * per:(rank + 1) * per].to(dtype), y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def shard(model: nn.Module, mesh_shape: tuple[int, ...], mixed: bool = False, reshard: bool = True) -> None:
    """``fully_shard`` on every module with parameters of its own below the root (per layer), then the root;
    ``reshard``: ``reshard_after_forward`` of the layers."""
    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    kw: dict = {"mesh": mesh}
    if mixed:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for m in list(model.children())[::-1]:
        if any(True for _ in m.parameters()):
            fully_shard(m, reshard_after_forward=reshard, **kw)
    fully_shard(model, **kw)


def equivalence(rank: int, world: int, out: Path, kind: str, mesh_shape: list[int], configs: list[dict]) -> dict:
    """Train the sharded model with each config; rank 0 saves the full final parameters. Reports, per config,
    which layers each rank formed whole (its own only), the largest tensor it received in K-FAC's exchange (never
    a whole parameter) and the layers whose decompositions it holds."""
    report = {}
    for i, cfg in enumerate(configs):
        cfg = dict(cfg)
        reshard = cfg.pop("reshard_after_forward", True)
        model = make_model(kind)
        shard(model, tuple(mesh_shape), reshard=reshard)
        opt = make_optimizer(model, cfg)
        pre = opt.preconditioner
        formed: list[str] = []
        for name, adapter in pre.adapters.items():
            adapter.matrix_of = _recording(adapter.matrix_of, name, formed)
        received: list[int] = []
        comm = pre.communicator
        layer_numel = {n: sum(p.numel() for p in a.parameters()) for n, a in pre.adapters.items()}  # global
        local_numel = {n: sum(p.to_local().numel() for p in a.parameters()) for n, a in pre.adapters.items()}
        comm.all_to_all = _received(comm.all_to_all, received)
        train(model, opt, kind, rank, world)
        params = [p.full_tensor().detach() for p in model.parameters()]
        if rank == 0:
            torch.save(params, out / f"params{i}.pt")
        report[str(i)] = {
            "workers": {n: pre.engine.shards.workers[n] for n in pre.layers if n in pre.engine.shards},
            "sharded": sorted(n for n in pre.layers if n in pre.engine.shards), "layers": pre.layers,
            "formed": sorted(set(formed)), "received_per_call": received,
            "layer_numel": layer_numel, "local_numel": local_numel,
            "decompositions": sorted(n for n in pre.layers if pre.engine.method.ready(pre.store[n])),
            "position": pre.engine.shards.position, "members": list(pre.engine.shards.members),
            "strategy": pre.plan.strategy, "bytes": {k: float(v) for k, v in comm.bytes_sent.items()}}
    return report


def _recording(fn, name: str, formed: list[str]):
    def wrapped(grads):
        formed.append(name)
        return fn(grads)
    return wrapped


def _received(fn, sizes: list[int]):
    def wrapped(sends, like, **kw):
        sizes.append(sum(t.numel() for ts in like for t in ts))
        return fn(sends, like, **kw)
    return wrapped


def mixed_precision(rank: int, world: int, out: Path, kind: str) -> dict:
    """bf16 parameters in forward/backward, fp32 reduction and factors: the run's losses and skipped steps; rank 0
    saves the final parameters."""
    model = make_model(kind).float()
    shard(model, (world,), mixed=True)
    opt = make_optimizer(model, {"factor_dtype": torch.float32})
    losses = train(model, opt, kind, rank, world)
    params = [p.full_tensor().detach() for p in model.parameters()]
    if rank == 0:
        torch.save(params, out / "params_bf16.pt")
    return {"losses": losses, "skipped": opt.preconditioner.skipped_steps}



def refusals(rank: int, world: int, out: Path) -> dict:
    """What M-FAC given a process group other than a shard group says: a clear error at construction."""
    import torch.distributed as dist

    model = make_model("mlp")
    shard(model, (world, 1))
    try:
        kfac.MFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), process_group=dist.group.WORLD)
        return {"mfac-group": "built"}
    except ValueError as exc:
        return {"mfac-group": str(exc)}


def mfac_equivalence(rank: int, world: int, out: Path, kind: str, mesh_shape: list[int], configs: list[dict]) -> dict:
    """M-FAC on the sharded model with each config; rank 0 saves the full final parameters."""
    for i, cfg in enumerate(configs):
        model = make_model(kind)
        shard(model, tuple(mesh_shape))
        opt = kfac.MFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **cfg)
        train(model, opt, kind, rank, world)
        params = [p.full_tensor().detach() for p in model.parameters()]
        if rank == 0:
            torch.save(params, out / f"mfac{i}.pt")
    return {}


def influence(rank: int, world: int, out: Path, kind: str, method: str, batches: int) -> dict:
    """Fit and score the sharded model (``batches`` training batches of 4, batch ``i`` on rank ``i % world``: an
    uneven count leaves a rank one pass short); rank 0 saves pairwise and self scores."""
    from kfac.influence import ClassificationTask, InfluenceAnalyzer

    model = make_model(kind)
    train, queries = influence_data(kind, batches)
    shard(model, (world,))
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False)
    an.fit(train)
    scores = {"pairwise": an.pairwise_scores(queries, train), "self": an.self_scores(train)}
    if rank == 0:
        torch.save(scores, out / "influence.pt")
    return {"layers": an.layers}


def lm_influence(rank: int, world: int, out: Path, kind: str, batches: int) -> dict:
    """Per-token EK-FAC scores of the sharded language model (``CausalLMTask``); rank 0 saves them."""
    from kfac.influence import CausalLMTask, InfluenceAnalyzer

    model = make_model(kind)
    train, queries = lm_data(batches)
    shard(model, (world,))
    an = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False)
    an.fit(train)
    scores = an.per_token_scores(queries, train)
    if rank == 0:
        torch.save(scores, out / "per_token.pt")
    return {"layers": an.layers}


def lm_data(batches: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (4 * batches + 2, 6), generator=g)
    return [ids[4 * i:4 * i + 4] for i in range(batches)], [ids[-2:]]


def influence_data(kind: str, batches: int) -> tuple[list, list]:
    x, y = batch(0, kind)
    x2, y2 = batch(1, kind)
    x, y = torch.cat([x, x2]), torch.cat([y, y2])
    return [(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i in range(batches)], [(x[-3:], y[-3:])]



def adaptive_train(model: nn.Module, kind: str, rank: int = 0, world: int = 1, steps: int = STEPS, start: int = 0,
                   opt: torch.optim.Optimizer | None = None, fixed_batch: bool = False,
                   **cfg) -> tuple[torch.optim.Optimizer, list[float]]:
    """Adaptive K-FAC (base SGD with ``weight_decay``: the decayed curvature term too) for steps ``start ..
    steps - 1`` on this rank's slice of each global batch (``fixed_batch``: of the first batch at every step;
    ``opt``: continue that optimizer); the optimizer and the losses. ``cfg``: K-FAC options over the defaults
    below."""
    model_ = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    dtype = next(model_.parameters()).dtype
    opt = opt if opt is not None else make_adaptive(model, cfg)
    per, losses = GLOBAL_BATCH // world, []
    for step in range(start, steps):
        step = 0 if fixed_batch else step
        x, y = lm_batch(step) if kind.startswith("lm") else batch(step, kind)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        x = x if kind.startswith("lm") else x.to(dtype)
        loss = (lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten())) if kind.startswith("lm") else (
            lambda: F.cross_entropy(model(x), y))
        losses.append(float(opt.step(loss)))
    return opt, losses


ADAPTIVE_KW = dict(factor_dtype=torch.float64, fisher="empirical", step_timeout=60)


def make_adaptive(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Adaptive K-FAC with options ``cfg`` over :data:`ADAPTIVE_KW` (base SGD with ``weight_decay``)."""
    from kfac.adaptive.controller import AdaptiveConfig

    return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=1e-3),
                     adaptive=AdaptiveConfig(adapt_every=2), **{**ADAPTIVE_KW, **cfg})


def lm_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs of a global batch of random sequences."""
    g = torch.Generator().manual_seed(4000 + step)
    ids = torch.randint(0, 11, (GLOBAL_BATCH, 7), generator=g)
    return ids[:, :-1], ids[:, 1:]


def adaptive(rank: int, world: int, out: Path, kind: str, mesh_shape: list[int], configs: list[dict],
             ddp: bool = False) -> dict:
    """Adaptive K-FAC on the sharded model (``ddp``: under DDP instead) with each config (``mixed``: bf16
    parameters, fp32 reduction); rank 0 saves the full final parameters. Reports λ, the steps taken, undone and
    rejected, the last step's coefficients and the losses."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    report = {}
    for i, cfg in enumerate(configs):
        cfg = dict(cfg)
        mixed = cfg.pop("mixed", False)  # the other keys go to adaptive_train
        model = make_model(kind)
        if mixed:
            model = model.float()
            cfg["factor_dtype"] = torch.float32
        if ddp:
            wrapped: nn.Module = DDP(model)
        else:
            shard(model, tuple(mesh_shape), mixed=mixed)
            wrapped = model
        opt, losses = adaptive_train(wrapped, kind, rank, world, **cfg)
        params = [p.detach() if ddp else p.full_tensor().detach() for p in model.parameters()]
        if rank == 0:
            torch.save(params, out / f"adaptive{i}.pt")
        a = opt.adaptive
        report[str(i)] = {"damping": a.damping, "steps": a.steps, "undone": a.undone, "rejected": a.rejected,
                          "last": a.last, "losses": losses}
    return report


def influence_index(rank: int, world: int, out: Path, kind: str, batches: int, sharded: bool) -> dict:
    """Build a gradient index of the model (``sharded``: FSDP2 across the ranks, else a plain model under the
    default process group) from ``batches`` batches split over the ranks, and answer a two-stage query; rank 0
    saves its top-k and scores."""
    from kfac.influence import ClassificationTask, GradientIndex, InfluenceAnalyzer

    model = make_model(kind)
    train, queries = influence_data(kind, batches)
    if sharded:
        shard(model, (world,))
    an = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False)
    an.fit(train)
    index = an.build_index(out / "index", train[:2], dims=5, dtype=torch.float32)
    an.add_to_index(index, train[2:])
    reopened = GradientIndex.open(out / "index")
    top = an.top_k(queries, reopened, k=4)
    scores = an.pairwise_scores(queries, reopened)
    dataset = [(x[i], y[i]) for x, y in train for i in range(len(x))]
    two_stage = an.top_k(queries, dataset, k=3, candidates=two_stage_candidates(len(dataset), 3), batch_size=3)
    if rank == 0:
        torch.save({"scores": scores, "indices": top.indices, "examples": len(reopened),
                    "shards": len(reopened.manifest["shards"]), "two_stage": two_stage.indices},
                   out / "index_scores.pt")
    return {"examples": len(index)}


def two_stage_candidates(n: int, queries: int) -> torch.Tensor:
    """Fixed candidate positions (7 per query) for the two-stage checks."""
    return torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(q))[:7] for q in range(queries)])
