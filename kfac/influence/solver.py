"""Exact inverse-curvature-vector products for influence queries: conjugate gradients on the damped Gauss-Newton
matrix or Hessian of the training loss, preconditioned by the fitted curvature.

For each query gradient ``b = grad f(q)`` (in the tracked layers' ``(g_dim, a_dim)`` matrix layout) the solver
approximates ``x = (K + D)^-1 b``, with ``D`` each layer's damping on the diagonal and ``K`` one of two exact
matrices of the *mean* per-example training loss ``(1/N) sum_n L(z_n)`` over the data the curvature was fitted on,
with respect to the tracked layers' parameters:

* ``"ggn"``: the generalised Gauss-Newton matrix ``(1/N) sum_n J_n^T (d^2 L_n / dz^2) J_n`` (``z``: the task's
  :meth:`~kfac.influence.Task.outputs`). Positive semi-definite for convex losses; the matrix that K-FAC and EK-FAC
  approximate (their Fisher, for cross-entropy), and the Hessian itself for a linear model;
* ``"hessian"``: the Hessian (Koh & Liang's influence), which adds the network's own second derivatives and is
  indefinite away from a minimum.

The fitted method's own map ``M = (C + D)^-1`` (EK-FAC, K-FAC, M-FAC or the identity) is the preconditioner and the
starting point ``x_0 = M b``, so zero iterations reproduce the direct answer. Each iteration costs one pass over the
training data with a product per unconverged query (double backward -- reverse over reverse for ``J v`` --, batched
over the queries where ``torch.autograd.grad(is_grads_batched=True)`` can; batches are shared across ranks like
every other pass).

A query stops at ``||r|| <= tolerance ||b||`` (``r = b - (K + D) x``), after ``iterations`` iterations, or where
``p^T (K + D) p <= 0``: CG is undefined on an indefinite system (a warning says for how many queries) and such a
query keeps the direct answer ``x_0``. On a positive definite system the last iterate is CG's best in the
``(K + D)``-norm. Models sharded with FSDP2 are refused.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._tensor import differentiable_kernels
from ..distributed.fsdp import sharded_parameters
from ..modules import ModuleAdapter
from .passes import DataPasses
from .task import Task

__all__ = ["PRODUCTS", "conjugate_gradients", "curvature_products"]

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


def _batched_grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor],
                  ) -> list[Tensor | None]:
    """``autograd.grad`` of ``outputs`` for each of the ``n`` stacked ``cotangents`` (``(n, *shape)``): one
    vmapped backward where it can batch them, else one backward each (the graph is kept)."""
    try:
        return list(torch.autograd.grad(outputs, inputs, grad_outputs=cotangents, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True))
    except RuntimeError as err:  # an operator vmap cannot batch
        logger.debug("influence: batched backward failed (%s); one direction at a time", err)
    each = [torch.autograd.grad(outputs, inputs, grad_outputs=[c[i] for c in cotangents], retain_graph=True,
                                allow_unused=True) for i in range(cotangents[0].shape[0])]
    return [None if each[0][j] is None else torch.stack([e[j] for e in each]) for j in range(len(inputs))]


def _hessian_batch(task: Task, model: nn.Module, batch: Any, params: list[nn.Parameter], tangents: list[Tensor],
                   ) -> tuple[list[Tensor | None], int]:
    """``sum_n d^2 L_n / dθ^2 v`` over one batch (double backward), and its number of examples."""
    values = task.loss(model, batch)
    grads = torch.autograd.grad(values.sum(), params, create_graph=True)
    return _batched_grad(grads, params, tangents), values.shape[0]


def _ggn_batch(task: Task, model: nn.Module, batch: Any, params: list[nn.Parameter], tangents: list[Tensor],
               ) -> tuple[list[Tensor | None], int]:
    """``sum_n J_n^T (d^2 L_n / dz^2) J_n v`` over one batch: ``J v`` as the derivative of ``u -> J^T u``
    (reverse over reverse), the output-space Hessian by double backward of ``Task.output_loss``, then ``J^T``."""
    z = task.outputs(model, batch)
    u = torch.zeros_like(z, requires_grad=True)
    jtu = torch.autograd.grad(z, params, grad_outputs=u, create_graph=True)
    jv = _batched_grad(jtu, [u], tangents)[0]
    zd = z.detach().requires_grad_(True)
    values = task.output_loss(zd, batch)
    gz = torch.autograd.grad(values.sum(), zd, create_graph=True)
    hjv = jv if jv is None else _batched_grad(gz, [zd], [jv])[0]
    if hjv is None:  # the tracked parameters do not reach the outputs
        return [None] * len(params), values.shape[0]
    return _batched_grad([z], params, [hjv]), values.shape[0]


PRODUCTS: dict[str, Callable[..., tuple[list[Tensor | None], int]]] = {"hessian": _hessian_batch, "ggn": _ggn_batch}
"""The curvature ``solver`` names, one batch's products with it."""


def curvature_products(passes: DataPasses, loader: Iterable[Any], vectors: Mats, *, curvature: str) -> Mats:
    """``K v`` for each of the ``n`` directions ``v`` (``{layer: (n, g, a)}``): ``K`` the Hessian (``"hessian"``) or
    the Gauss-Newton matrix (``"ggn"``) of the mean training loss over ``loader``, with respect to the tracked
    layers' parameters (one pass; summed over ranks)."""
    adapters, layers = passes.engine.adapters, list(vectors)
    params = _parameters(adapters, layers)
    tangents = [t for n in layers for t in _split(adapters[n], vectors[n])]
    tangents = [t.to(p.dtype) for t, p in zip(tangents, params)]
    sums = [torch.zeros_like(t, dtype=torch.float64) for t in tangents]
    count = torch.zeros((), dtype=torch.float64, device=passes.device)
    for _, batch in passes.batches(loader, f"{curvature}-vector products"):
        with torch.enable_grad(), differentiable_kernels():  # fused attention kernels have no double backward
            outs, n = PRODUCTS[curvature](passes.task, passes.model, batch, params, tangents)
        count += n
        for acc, o in zip(sums, outs):
            if o is not None:
                acc += o.detach().double()
    *sums, count = passes.engine.communicator.all_reduce_sum([*sums, count], category="influence", exact=True)
    if count.item() == 0:
        raise ValueError(f"influence: solver={curvature!r} found no training examples for its products")
    out, i = {}, 0
    for name in layers:
        k = len(adapters[name].parameters())
        out[name] = _merge(adapters[name], [t / count for t in sums[i:i + k]], vectors[name])
        i += k
    return out


def _dot(x: Mats, y: Mats) -> Tensor:
    """Per-direction inner products over every layer: ``(n,)`` in float64."""
    return sum((x[k].double() * y[k].double()).flatten(1).sum(1) for k in x)  # type: ignore[return-value]


def conjugate_gradients(passes: DataPasses, loader: Iterable[Any], b: Mats, *, curvature: str,
                        inverse: Callable[[Mats], Mats], damping: dict[str, float], iterations: int,
                        tolerance: float) -> tuple[Mats, dict[str, Any]]:
    """Preconditioned CG for ``(K + D) x = b`` from ``x_0 = M b``, ``K`` as :func:`curvature_products` names it
    (see the module docstring); returns ``x`` and
    ``{"iterations", "relative_residual" (n,), "stopped_negative" (count)}`` (the residual of the answer returned)."""
    if sharded_parameters(passes.model.named_parameters()):
        raise ValueError(f"influence: solver={curvature!r} does not support models sharded with FSDP2 (its double "
                         "backward is not sharded); use solver='direct'")
    adapters = passes.engine.adapters
    b = project(adapters, b)
    n = next(iter(b.values())).shape[0]

    def precondition(r: Mats) -> Mats:
        return project(adapters, inverse(r))

    def operator(v: Mats, rows: Tensor) -> Mats:
        hv = curvature_products(passes, loader, {k: t[rows] for k, t in v.items()}, curvature=curvature)
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
    residual = start_residual.clone()
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
        r_rows = {k: t[rows] for k, t in r.items()}  # only the unconverged queries are preconditioned again
        z = precondition(r_rows)
        rz_new = _dot(r_rows, z)
        beta = rz_new / rz[rows].where(rz[rows] != 0, torch.ones_like(rz_new))
        for k in p:
            p[k][rows] = z[k] + beta.to(p[k].dtype).view(-1, *([1] * (p[k].dim() - 1))) * p_rows[k]
        rz[rows] = rz_new
        residual[rows] = _dot(r_rows, r_rows).sqrt()
        active = active & ~negative & (residual > tolerance * norm_b)
    for k in x:  # indefinite: CG's iterates mean nothing there, the direct answer stands
        x[k][negative] = start[k][negative]
    info["relative_residual"] = (torch.where(negative, start_residual, residual) / norm_b).float()
    info["stopped_negative"] = int(negative.sum())
    if negative.any():
        warnings.warn(f"influence: solver={curvature!r} met negative curvature (p^T (K + damping) p <= 0) for "
                      f"{int(negative.sum())} of {n} queries and kept the direct answer for them: the matrix is "
                      "indefinite here (not at a minimum, or too little damping)", RuntimeWarning, stacklevel=3)
    logger.info("influence: CG on the damped %s: %d queries, %d iterations, relative residual median %.2e",
                curvature, n, info["iterations"], float(info["relative_residual"].median()))
    return x, info
