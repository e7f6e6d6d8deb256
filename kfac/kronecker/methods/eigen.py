"""Eigen K-FAC (default; KAISA ``compute_method='eigen'``): the Kronecker-factored curvature ``F_layer ~ A (x) G``.

For a gradient matrix ``V`` (``g_dim x a_dim``; ``vec`` is column-major, so ``(A (x) G) vec(V) = vec(G V A)``), with
``A = QA diag(dA) QA^T`` and ``G = QG diag(dG) QG^T`` (eigenvalues clamped at 0),
``P(V) = QG [(QG^T V QA) / (dG dA^T + damping)] QA^T``, i.e. exactly ``(A (x) G + damping I)^-1 vec(V)``.
With ``relative_damping`` the damping is ``damping * mean(dG dA^T)`` (``tr(A) tr(G) / (a_dim g_dim)``) per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import ext
from ..store import FactorEntry
from .base import DecompositionError, KroneckerMethod, with_float64_retry
from .structure import eigh_clamped, factor_of, left, right, symmetrise

__all__ = ["EigenKFAC"]


class EigenKFAC(KroneckerMethod):
    """Eigendecomposition method (default; KAISA ``compute_method='eigen'``)."""

    name = "eigen"
    decomposition = "eigen"  # what the planner's cost model prices

    def fields(self, entry: FactorEntry, factor: str) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
        """``(name, shape, symmetric)`` of the decomposition tensors of ``factor`` (what a refresh produces)."""
        if factor == "A":
            d = entry.a_dim
            return (("dA", (d,), False),) if entry.a_diagonal else (("QA", (d, d), False), ("dA", (d,), False))
        return (("QG", (entry.g_dim, entry.g_dim), False), ("dG", (entry.g_dim,), False))

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:
        """Decompose one factor; on failure its decomposition is cleared and :class:`DecompositionError` raised."""
        try:
            m = factor_of(entry, factor)
            if factor == "A" and entry.a_diagonal:
                entry.QA, entry.dA = None, m.clamp(min=0)
                return
            d, q = with_float64_retry(eigh_clamped, symmetrise(m), f"{factor} of {entry.name!r}")
        except DecompositionError:
            for field, _, _ in self.fields(entry, factor):
                setattr(entry, field, None)
            raise
        if factor == "A":
            entry.QA, entry.dA = q, d
        else:
            entry.QG, entry.dG = q, d

    def ready(self, entry: FactorEntry) -> bool:
        return entry.dA is not None and entry.QG is not None and entry.dG is not None and (
            entry.a_diagonal or entry.QA is not None)

    def eigenvalues(self, entry: FactorEntry) -> Tensor:
        """The curvature's eigenvalues in the Kronecker eigenbasis ``QA (x) QG``, as a ``g_dim x a_dim`` matrix."""
        assert entry.dG is not None and entry.dA is not None  # callers check ready(entry) first
        return torch.outer(entry.dG, entry.dA)

    def scale(self, entry: FactorEntry, v: Tensor, damping: float) -> Tensor:
        """``v / (eigenvalues + damping)`` in the eigenbasis (fused by :func:`kfac.ext.eigen_scale`; a batch
        ``(b, g_dim, a_dim)`` broadcasts)."""
        if v.dim() == 2 and not self.relative_damping and ext.uses_extension("eigen_scale", v, v.numel()):
            assert entry.dG is not None and entry.dA is not None  # callers check ready(entry) first
            return ext.eigen_scale(v, entry.dG, entry.dA, damping)
        # One multiply by 1 / (eigenvalues + damping), cached until the decomposition or the damping changes
        # (instead of outer, add and divide at every step: fewer kernel launches on a GPU).
        hit = entry.cache.get("inv_eigenvalues")
        if hit is None or hit[0] is not entry.dG or hit[1] is not entry.dA or hit[2] != damping:
            hit = (entry.dG, entry.dA, damping, self.damped(self.eigenvalues(entry), damping).reciprocal_())
            entry.cache["inv_eigenvalues"] = hit
        return v * hit[3]

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        """The damped inverse applied to a ``(g_dim, a_dim)`` gradient matrix, or to a batch ``(b, g_dim,
        a_dim)`` of them."""
        QG, cache = entry.QG, entry.cache
        assert QG is not None  # callers check ready(entry) first
        v = left(QG, grad.to(QG.dtype), cache, "QG", transpose=True)
        if entry.QA is not None:
            v = right(v, entry.QA, cache, "QA")
        v = self.scale(entry, v, damping)
        v = left(QG, v, cache, "QG")
        if entry.QA is not None:
            v = right(v, entry.QA, cache, "QA", transpose=True)
        return v

    def diag(self, entry: FactorEntry, *, damping: float) -> Tensor:
        """Diagonal of the damped inverse, ``diag(P)[i, j] = sum_kl QG[i,k]^2 QA[j,l]^2 / (eig[k,l] + damping)``."""
        inv = 1.0 / self.damped(self.eigenvalues(entry), damping)
        assert entry.QG is not None  # callers check ready(entry) first
        out = entry.QG.square() @ inv
        return out if entry.QA is None else out @ entry.QA.square().T
