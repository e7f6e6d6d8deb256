"""EK-FAC eigenvalue corrections (George et al., 2018), collected during the backward pass.

On correction steps each backward pass projects its per-example gradients onto the eigenbases of the last refresh,
``(QG^T V_n QA)^2 / T_n`` summed over examples ``n`` (``T_n`` rows per example; nothing per-example is kept), and
the step divides the sum over ranks by the global example count and by ``world_size^2`` (the gradient-averaging
convention of :mod:`kfac.distributed.executor`) to get ``Lambda_batch`` (see :mod:`kfac.kronecker.methods.ekfac`).
In curvature units (``FactorEntry.gradient_sum``) ``Lambda_batch = sum_n (QG^T V_n QA)^2 / world_size^2``, the
diagonal of the batch loss's empirical Fisher in the Kronecker eigenbasis, in the units of ``dG dA^T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..distributed.comm import Communicator
from ..distributed.executor import Executor

if TYPE_CHECKING:
    from .layer import LayerState

__all__ = ["add", "update"]


def add(layer: "LayerState", method: Any, x: Tensor, grad: Tensor, scale: Tensor | float | None,
        dtype: torch.dtype) -> None:
    """Add this backward pass's projected per-example gradients of ``layer`` (``grad`` undone by the AMP
    ``scale``) to its pending correction sum."""
    g = grad.detach() if scale is None else grad.detach() / scale
    a_rows, g_rows = layer.adapter.example_rows(x, g, dtype)
    part = method.correction_sum(layer.entry, a_rows, g_rows)
    if part is not None:
        if not layer.entry.gradient_sum:  # KAISA's per-row units; curvature units: the plain sum over examples
            part = part / a_rows.shape[1]
        layer.corr_sum = part if layer.corr_sum is None else layer.corr_sum.add_(part)
        layer.corr_count += a_rows.shape[0]


def update(layers: Sequence["LayerState"], method: Any, executor: Executor, comm: Communicator, decay: float) -> None:
    """Fold the pending sums into each grad-worker layer's corrections: ``Lambda <- decay Lambda + (1 - decay)
    Lambda_batch`` (a collective over the layers' grad workers: every rank under ``comm-opt``)."""
    names, sums, counts = [], [], []
    for layer in layers:
        entry = layer.entry
        if not (executor.is_grad_worker(layer.name) and method.ready(entry)) or entry.a_diagonal:
            continue
        total = layer.corr_sum
        if total is None:
            assert entry.QG is not None  # a ready eigenbasis method's non-diagonal layer has QG
            total = torch.zeros(entry.g_dim, entry.a_dim, dtype=entry.QG.dtype, device=entry.QG.device)
        names.append(layer)
        sums.append(total)
        counts.append(float(layer.corr_count))
    if not names:
        return
    count = torch.tensor(counts, dtype=torch.float64, device=sums[0].device)
    if comm.enabled:
        count = comm.all_reduce_sum([count], category="correction_counts", exact=True)[0]
        sums = comm.all_reduce_sum(sums, category="corrections")
    scale = float(comm.world_size) ** 2
    for layer, total, n in zip(names, sums, count.tolist()):
        if n > 0:
            norm = scale if layer.entry.gradient_sum else n * scale
            method.update_corrections(layer.entry, total / norm, decay)
