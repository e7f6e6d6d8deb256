"""Fitting the curvature: Kronecker factors and eigenbases with EK-FAC's or K-FAC's ``Lambda``, or M-FAC's
gradients (the math is in :mod:`kfac.influence.analyzer`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import ext
from ..kronecker.methods import EigenCorrectedKFAC
from ..kronecker.preconditioner import KFACPreconditioner
from ..mfac.static import StaticFisher
from .arguments import InfluenceArguments
from .gradients import example_matrices
from .passes import DataPasses

__all__ = ["Fit", "collect_mfac_gradients", "fit_factors", "fit_lambda", "heuristic_damping", "mfac_curvature"]


@dataclass
class Fit:
    """What a fit records besides the factor store: per-layer damping and rows per example, the examples seen."""

    damping: dict[str, float] = field(default_factory=dict)
    rows_per_example: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    weights_sha256: str | None = None  # of the model's parameters when fitted (None: unknown, an old file)


def fit_factors(passes: DataPasses, engine: KFACPreconditioner, args: InfluenceArguments,
                method: EigenCorrectedKFAC, loader: Iterable[Any]) -> Fit:
    """``A``, ``G`` (plain averages over all rows), their eigenbases (:meth:`KFACPreconditioner.refresh`) and
    ``Lambda`` into ``engine.store``; returns the damping per layer."""
    comm, store, layers = engine.communicator, engine.store, passes.layers
    sums: dict[str, list[Tensor]] = {}
    device = passes.device
    tally = [[0, 0] for _ in layers]  # rows, examples
    for index, batch in passes.batches(loader, "fitting factors"):
        rows = passes.rows(batch, sampled=args.fisher == "mc", index=index)
        mask = passes.task.positions(batch)
        for i, name in enumerate(layers):
            a, g = rows[name]
            if mask is not None and tuple(mask.shape) == tuple(a.shape[:2]):  # only the positions that count
                keep = mask.to(a.device).bool()
                a2, g2 = a[keep], g[keep]
            else:
                a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            s = sums.setdefault(name, [a.new_zeros(a.shape[-1], a.shape[-1]), g.new_zeros(g.shape[-1],
                                                                                           g.shape[-1])])
            ext.sym_outer_update(a2, s[0])  # s += x^T x, the library's one factor-statistic op
            ext.sym_outer_update(g2, s[1])
            tally[i][0] += a2.shape[0]
            tally[i][1] += a.shape[0]
    counts = torch.tensor(tally, dtype=torch.float64, device=device).reshape(len(layers), 2)
    dtype = getattr(torch, args.factor_dtype)
    flat = [sums.get(n, [torch.zeros(e.a_dim, e.a_dim, dtype=dtype, device=device),
                         torch.zeros(e.g_dim, e.g_dim, dtype=dtype, device=device)])[k]
            for n, e in ((n, store[n]) for n in layers) for k in (0, 1)]
    if comm.enabled:
        counts = comm.all_reduce_sum([counts], category="influence", exact=True)[0]
        flat = comm.all_reduce_sum(flat, category="influence")
    if bool((counts[:, 1] == 0).any()):
        raise ValueError("influence: fit() saw no training examples")
    masked = [n for n, rows_n in zip(layers, counts[:, 0].tolist()) if rows_n == 0]
    if masked:
        raise ValueError(f"influence: fit() saw {int(counts[0, 1])} training examples but not one position that "
                         f"counts for layers {masked}: the task's positions() (e.g. the attention mask) masks every "
                         "position of the training data; fit on data with unmasked positions")
    fit = Fit(examples=int(counts[0, 1]))
    for i, name in enumerate(layers):
        entry = store[name]
        rows_n, examples = counts[i].tolist()
        entry.A = (flat[2 * i] + flat[2 * i].T) / (2 * rows_n)
        entry.G = (flat[2 * i + 1] + flat[2 * i + 1].T) / (2 * rows_n)
        entry.num_updates = 1
        fit.rows_per_example[name] = rows_n / examples
    engine.refresh()  # eigenbases, decomposed by their owners and shared (comm-opt)
    if args.method == "ekfac":
        fit_lambda(passes, engine, method, loader, sampled=args.fisher == "mc" and args.lambda_labels == "sampled")
    else:
        for name in layers:
            e = store[name]
            assert e.dG is not None and e.dA is not None  # refresh() decomposed every layer
            e.extras["Lambda"] = fit.rows_per_example[name] * torch.outer(e.dG, e.dA)
    if args.damping is not None:
        fit.damping = {name: float(args.damping) for name in layers}
    else:
        fit.damping = heuristic_damping({name: store[name].extras["Lambda"] for name in layers})
    return fit


def heuristic_damping(lambdas: dict[str, Tensor]) -> dict[str, float]:
    """``0.1 * mean(Lambda)`` per layer. A layer whose curvature is zero on the fitted data (every gradient it
    received was zero, e.g. upstream of a zero-initialised head) would get no damping and ``0 / 0`` scores; it gets
    the largest damping of the other layers (1 if none has any) instead, with a warning."""
    damping = {name: 0.1 * float(lam.mean()) for name, lam in lambdas.items()}
    flat = [n for n, d in damping.items() if not d > 0]
    if flat:
        fallback = max((d for d in damping.values() if d > 0), default=1.0)
        for name in flat:
            damping[name] = fallback
        warnings.warn(f"influence: layers {flat} have zero curvature on the fitted data (all their gradients were "
                      f"zero); their damping falls back to {fallback:.3g} (the largest of the other layers)",
                      stacklevel=4)
    return damping


def fit_lambda(passes: DataPasses, engine: KFACPreconditioner, method: EigenCorrectedKFAC,
               loader: Iterable[Any], *, sampled: bool) -> None:
    """EK-FAC's ``Lambda = mean_n (QG^T V_n QA)^2`` into ``engine.store`` (``sampled``: at the labels the factor
    pass sampled for each batch, the Fisher of ``A`` and ``G``; else at the data's own labels)."""
    comm, store, layers = engine.communicator, engine.store, passes.layers
    sums: dict[str, Tensor] = {}
    for n in layers:
        QG = store[n].QG
        assert QG is not None  # refresh() decomposed every layer
        sums[n] = torch.zeros(store[n].g_dim, store[n].a_dim, dtype=QG.dtype, device=QG.device)
    count = 0
    for index, batch in passes.batches(loader, "fitting eigenvalue corrections"):
        rows = passes.rows(batch, sampled=sampled, index=index)
        for name in layers:
            part = method.correction_sum(store[name], *rows[name])
            assert part is not None  # every tracked layer is decomposed and not diagonal
            sums[name] += part
        count += next(iter(rows.values()))[0].shape[0]
    if comm.enabled:
        total = torch.tensor([count], dtype=torch.float64, device=passes.device)
        count = int(comm.all_reduce_sum([total], category="influence", exact=True)[0])
        reduced = comm.all_reduce_sum([sums[n] for n in layers], category="influence")
        sums = dict(zip(layers, reduced))
    for name in layers:
        store[name].extras["Lambda"] = sums[name] / float(count)


def collect_mfac_gradients(passes: DataPasses, args: InfluenceArguments, loader: Iterable[Any]
                           ) -> dict[str, Tensor]:
    """The gradient matrices ``{layer: (m, g_dim, a_dim)}`` of the first ``m = num_grads`` training examples
    (every rank reads every batch)."""
    m = args.num_grads
    grads: dict[str, list[Tensor]] = {n: [] for n in passes.layers}
    seen = 0
    for i, batch in passes.batches(loader, "collecting M-FAC gradients", shard=False):
        rows = passes.rows(batch, sampled=args.fisher == "mc", index=i)
        take = min(m - seen, next(iter(rows.values()))[0].shape[0])
        for name in passes.layers:
            a, g = rows[name]
            grads[name].append(example_matrices(a[:take], g[:take]))
        seen += take
        if seen >= m:
            break
    if seen == 0:
        raise ValueError("influence: fit() saw no training examples")
    return {n: torch.cat(v) for n, v in grads.items()}


def mfac_curvature(grads: dict[str, Tensor], damping: float | None) -> tuple[StaticFisher, Fit]:
    """M-FAC's static Fisher of ``grads`` (all layers jointly) and its fit; ``damping=None``: ``0.1 * mean(g^2)``."""
    if damping is not None:
        damping = float(damping)
    else:
        total = sum(float(g.double().square().sum()) for g in grads.values())
        numel = sum(g[0].numel() for g in grads.values())
        damping = 0.1 * total / (numel * next(iter(grads.values())).shape[0])
        if not damping > 0:
            warnings.warn("influence: every stored gradient is zero; M-FAC's damping falls back to 1", stacklevel=3)
            damping = 1.0
    fisher = StaticFisher(grads, damping=damping, blocks="global")
    return fisher, Fit(damping={n: damping for n in grads}, examples=next(iter(grads.values())).shape[0])
