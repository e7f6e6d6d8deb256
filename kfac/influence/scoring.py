"""Scoring: preconditioned gradients, preconditioned query gradients, per-batch blocks of scores, and their
assembly across batches and ranks (the score convention is in :mod:`kfac.influence.analyzer`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed.comm import Communicator
from ..kronecker.methods import EigenCorrectedKFAC
from ..kronecker.store import FactorStore
from ..mfac.static import StaticFisher
from .gradients import example_matrices
from .passes import DataPasses

__all__ = ["Blocks", "InverseMap", "TopK", "assemble", "precondition", "query_gradients", "score_batch",
           "self_score_batch"]

Blocks = list[tuple[int, dict[str, Tensor]]]  # (batch index, {layer: scores}) in any order
InverseMap = Callable[[dict[str, Tensor]], dict[str, Tensor]]  # (C + damping I)^-1 on {layer: (n, g, a)}


@dataclass
class TopK:
    """The ``k`` highest scores per query: ``indices[q]`` (training-set positions) and ``scores[q]``."""

    indices: Tensor
    scores: Tensor


def precondition(mats: dict[str, Tensor], *, method: str, damping: Mapping[str, float], store: FactorStore,
                 kfac: EigenCorrectedKFAC, mfac: StaticFisher | None) -> dict[str, Tensor]:
    """``(C + damping I)^-1`` applied to per-example gradient matrices ``{layer: (n, g_dim, a_dim)}``."""
    if method == "identity":
        return mats
    if method == "mfac":
        assert mfac is not None  # fitted with the method
        n = next(iter(mats.values())).shape[0]
        outs = [mfac.ihvp({k: v[i] for k, v in mats.items()}) for i in range(n)]
        return {k: torch.stack([o[k] for o in outs]) if n else v.clone()
                for k, v in mats.items()}
    return {name: kfac.precondition(store[name], v, damping=damping[name])
            for name, v in mats.items()}  # EK-FAC's map with this fit's Lambda (K-FAC's: T outer(dG, dA))


def query_gradients(passes: DataPasses, query_loader: Iterable[Any], inverse: InverseMap, *,
                    dtype: torch.dtype, query_rank: int | None) -> dict[str, Any]:
    """Preconditioned query gradients per layer (full ``(nq, g, a)``, or ``(US, V)`` of rank ``query_rank``)."""
    r = query_rank
    parts: dict[str, list] = {n: [] for n in passes.layers}
    for _, batch in passes.batches(query_loader, "preconditioning queries", shard=False):
        rows = passes.rows(batch, sampled=False, measurement=True)
        pre = inverse({n: example_matrices(*rows[n]) for n in passes.layers})
        for name, p in pre.items():
            if r is None:
                parts[name].append(p.to(dtype))
            else:
                u, s, vh = torch.linalg.svd(p.to(torch.float64), full_matrices=False)
                k = min(r, s.shape[-1])
                parts[name].append(((u[..., :k] * s[..., None, :k]).to(dtype), vh[..., :k, :].mT.to(dtype)))
    if not parts[passes.layers[0]]:
        raise ValueError("influence: the query loader yielded no examples")
    if r is None:
        return {n: torch.cat(v) for n, v in parts.items()}
    return {n: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for n, v in parts.items()}


@torch.no_grad()
def score_batch(queries: Mapping[str, Any], rows: Mapping[str, tuple[Tensor, Tensor]], layers: Iterable[str],
                dtype: torch.dtype) -> dict[str, Tensor]:
    """``{layer: [n_query, n_batch]}`` scores of one training batch's rows against the preconditioned queries."""
    out = {}
    for name in layers:
        a, g = (t.to(dtype) for t in rows[name])
        q = queries[name]
        if isinstance(q, tuple):  # low rank: sum_t sum_k (g_t . (US)_k)(a_t . V_k)
            us, v = q
            out[name] = torch.einsum("ntg,qgk,nta,qak->qn", g, us, a, v)
        else:
            mats = example_matrices(a, g)
            out[name] = q.flatten(1) @ mats.flatten(1).T  # flatten, not reshape(n, -1): n may be 0
    return out


@torch.no_grad()
def token_score_batch(queries: Mapping[str, Any], rows: Mapping[str, tuple[Tensor, Tensor]], layers: Iterable[str],
                      dtype: torch.dtype) -> dict[str, Tensor]:
    """``{layer: [n_query, n_batch, T]}``: each example's score split over the ``T`` rows (token positions) of its
    gradient ``V_n = sum_t g_nt a_nt^T``; every layer must see the same ``T``."""
    layers = list(layers)
    lengths = {n: rows[n][0].shape[1] for n in layers}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"influence: per-token scores need every tracked layer to see the same number of positions "
                         f"per example, got {lengths}; track only the sequence layers (tracked_modules=...)")
    out = {}
    for name in layers:
        a, g = (t.to(dtype) for t in rows[name])
        q = queries[name]
        if isinstance(q, tuple):
            us, v = q
            out[name] = torch.einsum("ntg,qgk,nta,qak->qnt", g, us, a, v)
        else:
            out[name] = torch.einsum("qga,ntg,nta->qnt", q, g, a)
    return out


def self_score_batch(rows: Mapping[str, tuple[Tensor, Tensor]], layers: Iterable[str],
                     inverse: InverseMap, dtype: torch.dtype) -> dict[str, Tensor]:
    """``{layer: [n_batch]}``: ``grad L(z)^T (C + damping I)^-1 grad L(z)`` of one training batch's rows."""
    mats = {n: example_matrices(*rows[n]) for n in layers}
    pre = inverse(mats)
    return {n: (pre[n].to(dtype) * mats[n].to(dtype)).sum((1, 2)) for n in layers}


def assemble(blocks: Blocks, layers: Iterable[str], comm: Communicator, *, per_layer: bool, axis: int
             ) -> Tensor | dict[str, Tensor]:
    """Every rank's blocks in batch order, concatenated along ``axis`` (summed over layers unless ``per_layer``)."""
    if comm.enabled:
        gathered = comm.all_gather_object([(i, {n: t.cpu() for n, t in b.items()}) for i, b in blocks])
        blocks = [item for part in gathered for item in part]
    blocks.sort(key=lambda ib: ib[0])
    if not blocks:
        raise ValueError("influence: the training loader yielded no examples")
    if blocks[0][1] and next(iter(blocks[0][1].values())).dim() == 3:  # per-token: pad to the longest batch
        longest = max(t.shape[2] for _, b in blocks for t in b.values())
        blocks = [(i, {n: F.pad(t, (0, longest - t.shape[2])) for n, t in b.items()}) for i, b in blocks]
    per = {n: torch.cat([b[n] for _, b in blocks], dim=axis) for n in layers}
    return per if per_layer else sum(per.values())  # type: ignore[return-value]  # layers: not empty
