"""Exact inverse-Hessian-vector products for influence queries: conjugate gradients on the damped Hessian of the
training loss, preconditioned by the fitted curvature.

For each query gradient ``b = grad f(q)`` (in the tracked layers' ``(g_dim, a_dim)`` matrix layout) the solver
approximates ``x = (H + D)^-1 b``, where ``H`` is the exact Hessian of the *mean* per-example training loss
``(1/N) sum_n L(z_n)`` over the data the curvature was fitted on, restricted to the tracked layers' parameters, and
``D`` holds each layer's damping on its diagonal. The fitted method's own map ``M = (C + D)^-1`` (EK-FAC, K-FAC,
M-FAC or the identity) is the preconditioner and the starting point ``x_0 = M b``, so the solver can only refine
the direct answer, and zero iterations reproduce it. Each iteration costs one pass over the training data with a
Hessian-vector product per unconverged query (double backward, batched over the queries where
``torch.autograd.grad(is_grads_batched=True)`` can; batches are shared across ranks like every other pass).

A query stops at ``||r|| <= tolerance ||b||`` (``r = b - (H + D) x``), after ``iterations`` iterations, or where
``p^T (H + D) p <= 0``: away from a minimum ``H`` can be indefinite and CG is then undefined (a warning says for
how many queries) and such a query keeps the direct answer ``x_0``. On a positive definite system the last iterate
is CG's best in the ``(H + D)``-norm. Models sharded with FSDP2 are refused.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._tensor import differentiable_kernels
from ..distributed.fsdp import sharded_parameters
from ..modules import ModuleAdapter
from .passes import DataPasses

__all__ = ["conjugate_gradients", "hessian_products"]

logger = logging.getLogger("kfac")

Mats = dict[str, Tensor]  # {layer: (n, g_dim, a_dim)}


def _parameters(adapters: dict[str, ModuleAdapter], layers: list[str]) -> list[nn.Parameter]:
    """The tracked layers' parameters in layer order (tracking never gives two layers one parameter)."""
    return [p for name in layers for p in adapters[name].parameters()]


def _split(adapter: ModuleAdapter, mats: Tensor) -> list[Tensor]:
    """``(n, g, a)`` matrices as per-parameter tensors ``(n, *shape)``."""
    parts = [adapter.split_matrix(m) for m in mats]
    return [torch.stack(list(ps)) for ps in zip(*parts)]


def _merge(adapter: ModuleAdapter, grads: list[Tensor], like: Tensor) -> Tensor:
    """Per-parameter tensors ``(n, *shape)`` as ``(n, g, a)`` matrices (``like``'s dtype)."""
    mats = [adapter.matrix_of([g[i] for g in grads]) for i in range(like.shape[0])]
    return torch.stack([m if m is not None else torch.zeros_like(like[0]) for m in mats]).to(like.dtype)


def project(adapters: dict[str, ModuleAdapter], mats: Mats) -> Mats:
    """Matrices restricted to the entries that are parameters (e.g. zero off the blocks of a packed attention
    projection): ``matrix_of(split_matrix(m))``."""
    return {n: _merge(adapters[n], _split(adapters[n], m), m) for n, m in mats.items()}


def hessian_products(passes: DataPasses, loader: Iterable[Any], vectors: Mats) -> Mats:
    """``H v`` for each of the ``n`` directions ``v`` (``{layer: (n, g, a)}``), ``H`` the Hessian of the mean
    training loss over ``loader`` restricted to the tracked layers' parameters (one pass; summed over ranks)."""
    adapters, layers = passes.engine.adapters, list(vectors)
    params = _parameters(adapters, layers)
    tangents = [t for n in layers for t in _split(adapters[n], vectors[n])]
    tangents = [t.to(p.dtype) for t, p in zip(tangents, params)]
    sums = [torch.zeros_like(t, dtype=torch.float64) for t in tangents]
    count = torch.zeros((), dtype=torch.float64, device=passes.device)
    batched = True
    for _, batch in passes.batches(loader, "Hessian-vector products"):
        with torch.enable_grad(), differentiable_kernels():  # fused attention kernels have no double backward
            values = passes.task.loss(passes.model, batch)
            count += values.shape[0]
            grads = torch.autograd.grad(values.sum(), params, create_graph=True)
            outs: tuple[Tensor | None, ...] | None = None
            if batched:
                try:
                    outs = torch.autograd.grad(grads, params, grad_outputs=tangents, is_grads_batched=True,
                                               retain_graph=True, allow_unused=True)
                except RuntimeError as err:  # an operator vmap cannot batch: one direction at a time
                    logger.info("influence: Hessian-vector products one direction at a time (%s)", err)
                    batched = False
            if outs is None:
                each = [torch.autograd.grad(grads, params, grad_outputs=[t[i] for t in tangents], retain_graph=True,
                                            allow_unused=True) for i in range(tangents[0].shape[0])]
                outs = tuple(None if each[0][j] is None else torch.stack([e[j] for e in each])
                             for j in range(len(params)))
        for s, o in zip(sums, outs):
            if o is not None:
                s += o.detach().double()
    *sums, count = passes.engine.communicator.all_reduce_sum([*sums, count], category="influence", exact=True)
    if count.item() == 0:
        raise ValueError("influence: solver='cg' found no training examples for its Hessian-vector products")
    out, i = {}, 0
    for name in layers:
        k = len(adapters[name].parameters())
        out[name] = _merge(adapters[name], [s / count for s in sums[i:i + k]], vectors[name])
        i += k
    return out


def _dot(x: Mats, y: Mats) -> Tensor:
    """Per-direction inner products over every layer: ``(n,)`` in float64."""
    return sum((x[k].double() * y[k].double()).flatten(1).sum(1) for k in x)  # type: ignore[return-value]


def conjugate_gradients(passes: DataPasses, loader: Iterable[Any], b: Mats, *, inverse: Callable[[Mats], Mats],
                        damping: dict[str, float], iterations: int, tolerance: float) -> tuple[Mats, dict[str, Any]]:
    """Preconditioned CG for ``(H + D) x = b`` from ``x_0 = M b`` (see the module docstring); returns ``x`` and
    ``{"iterations", "relative_residual" (n,), "stopped_negative" (count)}`` (the residual of the answer returned)."""
    if sharded_parameters(passes.model.named_parameters()):
        raise ValueError("influence: solver='cg' does not support models sharded with FSDP2 (its double backward "
                         "is not sharded); use solver='direct'")
    adapters = passes.engine.adapters
    b = project(adapters, b)
    n = next(iter(b.values())).shape[0]

    def precondition(r: Mats) -> Mats:
        return project(adapters, inverse(r))

    def operator(v: Mats, rows: Tensor) -> Mats:
        hv = hessian_products(passes, loader, {k: t[rows] for k, t in v.items()})
        return {k: hv[k] + damping[k] * v[k][rows] for k in v}

    x = precondition(b)
    info: dict[str, Any] = {"iterations": 0, "relative_residual": torch.full((n,), float("nan")),
                            "stopped_negative": 0}
    if iterations == 0 or n == 0:
        return x, info
    everyone = torch.arange(n)
    ax = operator(x, everyone)
    r = {k: b[k] - ax[k] for k in b}
    z = precondition(r)
    p = {k: t.clone() for k, t in z.items()}
    rz = _dot(r, z)
    norm_b = _dot(b, b).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    start, start_residual = {k: t.clone() for k, t in x.items()}, _dot(r, r).sqrt()
    residual = start_residual
    active = residual > tolerance * norm_b
    negative = torch.zeros(n, dtype=torch.bool)
    for it in range(iterations):
        rows = everyone[active]
        if rows.numel() == 0:
            break
        info["iterations"] = it + 1
        ap = operator(p, rows)
        p_rows = {k: t[rows] for k, t in p.items()}
        pap = _dot(p_rows, ap)
        bad = ~(pap > 0)  # negative curvature (or a non-finite product)
        negative[rows[bad]] = True
        alpha = torch.where(bad, torch.zeros_like(pap), rz[rows] / pap.where(~bad, torch.ones_like(pap)))
        for k in x:
            a = alpha.to(x[k].dtype).view(-1, *([1] * (x[k].dim() - 1)))
            x[k][rows] += a * p_rows[k]
            r[k][rows] -= a * ap[k]
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = (rz_new / rz.where(rz != 0, torch.ones_like(rz))).to(next(iter(p.values())).dtype)
        p = {k: z[k] + beta.view(-1, *([1] * (z[k].dim() - 1))) * p[k] for k in p}
        rz = rz_new
        residual = _dot(r, r).sqrt()
        active = active & ~negative & (residual > tolerance * norm_b)
    for k in x:  # indefinite: CG's iterates mean nothing there, the direct answer stands
        x[k][negative] = start[k][negative]
    info["relative_residual"] = (torch.where(negative, start_residual, residual) / norm_b).float()
    info["stopped_negative"] = int(negative.sum())
    if negative.any():
        warnings.warn(f"influence: solver='cg' met negative curvature (p^T (H + damping) p <= 0) for "
                      f"{int(negative.sum())} of {n} queries and kept the direct answer for them: the Hessian is "
                      "indefinite here (not at a minimum, or too little damping)", RuntimeWarning, stacklevel=3)
    logger.info("influence: CG on the damped Hessian: %d queries, %d iterations, relative residual median %.2e",
                n, info["iterations"], float(info["relative_residual"].median()))
    return x, info
