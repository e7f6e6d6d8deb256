"""Eigen K-FAC (default; KAISA ``compute_method='eigen'``): the Kronecker-factored curvature ``F_layer ~ A (x) G``.

For a gradient matrix ``V`` (``g_dim x a_dim``; ``vec`` is column-major, so ``(A (x) G) vec(V) = vec(G V A)``), with
``A = QA diag(dA) QA^T`` and ``G = QG diag(dG) QG^T`` (eigenvalues clamped at 0),
``P(V) = QG [(QG^T V QA) / (dG dA^T + damping)] QA^T``, i.e. exactly ``(A (x) G + damping I)^-1 vec(V)``.
With ``relative_damping`` the damping is ``damping * mean(dG dA^T)`` (``tr(A) tr(G) / (a_dim g_dim)``) per layer.
With ``warm_start`` a refresh refines the previous eigenbasis instead of computing a new ``eigh``
(:mod:`kfac.kronecker.methods.warm`).

Truncated eigenbasis (``truncate = ε``, eigen method only): ``A`` is treated as ``QA_k diag(dA_k) QA_k^T + c (I -
QA_k QA_k^T)`` -- its eigendirections whose eigenvalue is within ``ε λ / max(dG)`` of the median ``c`` (typically
the flat bulk that K-FAC's identity initialisation and decay leave, or zeros) are given ``c`` exactly -- so with
``t_i = 1 / (dG_i c + λ)`` and ``S = 1 / (dG dA_k^T + λ)``::

    P(V) = QG [ (QG^T V) ⊙ t 1^T + ((QG^T V QA_k) ⊙ (S - t 1^T)) QA_k^T ]

which costs ``2 g a k`` instead of ``2 g a²`` on the ``A`` side. Each changed coefficient moves by at most
``|1/(x + λ) - 1/(y + λ)| <= |x - y| / λ² <= ε / λ``, so ``||P_trunc - P||_2 <= ε / λ``; exact where the bulk
eigenvalues equal ``c``. Used only when at most half of the columns are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import ext
from ..store import FactorEntry
from .base import DecompositionError, KroneckerMethod, with_float64_retry
from .structure import decoupled, eigh_clamped, factor_of, left, right, symmetrise
from .warm import WarmRefresher

__all__ = ["EigenKFAC"]


class EigenKFAC(KroneckerMethod):
    """Eigendecomposition method (default; KAISA ``compute_method='eigen'``)."""

    name = "eigen"
    decomposition = "eigen"  # what the planner's cost model prices
    warm: WarmRefresher | None = None
    """Set by :func:`~kfac.kronecker.methods.make_method` when refreshes are warm-started."""
    truncate: float | None = None
    """``ε`` of the truncated eigenbasis (see the module docstring); ``None``: exact."""

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
            m = symmetrise(m)
            warm = self.refine(entry, factor, m, damping)
            d, q = warm if warm is not None else with_float64_retry(eigh_clamped, m, f"{factor} of {entry.name!r}")
        except DecompositionError:
            for field, _, _ in self.fields(entry, factor):
                setattr(entry, field, None)
            raise
        if factor == "A":
            entry.QA, entry.dA = q, d
        else:
            entry.QG, entry.dG = q, d

    def refine(self, entry: FactorEntry, factor: str, m: Tensor, damping: float) -> tuple[Tensor, Tensor] | None:
        """The warm-started decomposition of ``factor`` (its symmetrised running matrix ``m``) from its previous
        eigenvectors, or ``None`` (compute ``eigh``: no warm start, no previous basis, a factor with exact block
        structure, or not accurate enough)."""
        previous = entry.QA if factor == "A" else entry.QG
        if self.warm is None or previous is None or not bool(torch.isfinite(m).all()) or decoupled(m) is not None:
            return None
        key = f"{entry.name}.{factor}"
        if not self.warm.attempt(key):
            return None
        out = self.warm.refine(m, previous, delta=self.damping_level(entry, factor, damping))
        self.warm.record(key, out is not None)
        return out

    def damping_level(self, entry: FactorEntry, factor: str, damping: float) -> float | None:
        """The damping as ``factor`` sees it, ``λ / max eigenvalue of the other factor`` (its last eigenvalues,
        else its trace, an upper bound; ``None`` where this rank does not hold it). With relative damping ``λ`` is
        ``damping * mean(dA) mean(dG)``, from the traces."""
        other = "G" if factor == "A" else "A"
        values = entry.dG if other == "G" else entry.dA
        running = getattr(entry, other)
        if values is not None:
            top = float(values.max())
        elif running is not None:
            top = float(running.max() if running.dim() == 1 else running.diagonal().sum())
        else:
            return None
        if self.relative_damping:
            if entry.A is None or entry.G is None:
                return None
            mean_a = float(entry.A.sum() if entry.A.dim() == 1 else entry.A.diagonal().sum()) / entry.a_dim
            damping = damping * mean_a * float(entry.G.diagonal().sum()) / entry.g_dim
        return damping / top if top > 0 else None

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

    def kept_columns(self, entry: FactorEntry, damping: float) -> tuple[Tensor, Tensor, float, float] | None:
        """``(indices, QA[:, indices], λ, c)`` of the truncated eigenbasis (see the module docstring), or ``None``
        to use the whole basis (no truncation, a diagonal ``A``, or more than half of the columns kept); cached per
        decomposition and damping."""
        if self.truncate is None or entry.QA is None:
            return None
        assert entry.dG is not None and entry.dA is not None  # callers check ready(entry) first
        hit = entry.cache.get("kept_columns")
        if hit is not None and hit[0] is entry.dA and hit[1] is entry.dG and hit[2] == damping:
            return hit[3]
        lam = damping * float(entry.dG.mean() * entry.dA.mean()) if self.relative_damping else damping  # = damped()
        bulk = float(entry.dA.median())
        keep = (float(entry.dG.max()) * (entry.dA - bulk).abs() > self.truncate * lam).nonzero().squeeze(1)
        cols = (keep, entry.QA[:, keep].contiguous(), lam, bulk) if 2 * keep.numel() <= entry.a_dim else None
        entry.cache["kept_columns"] = (entry.dA, entry.dG, damping, cols)
        return cols

    def precondition_truncated(self, entry: FactorEntry, grad: Tensor,
                               kept: tuple[Tensor, Tensor, float, float]) -> Tensor:
        """``P(V)`` with the truncated eigenbasis of ``A`` (see the module docstring)."""
        idx, qa_k, lam, bulk = kept
        QG, dG, dA = entry.QG, entry.dG, entry.dA
        assert QG is not None and dG is not None and dA is not None  # callers check ready(entry) first
        v = left(QG, grad.to(QG.dtype), entry.cache, "QG", transpose=True)
        tail = (dG * bulk + lam).reciprocal()  # t_i
        w = (v @ qa_k) * ((torch.outer(dG, dA[idx]) + lam).reciprocal() - tail[:, None])
        out = v * tail[:, None] + w @ qa_k.T
        return left(QG, out, entry.cache, "QG")

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        """The damped inverse applied to a ``(g_dim, a_dim)`` gradient matrix, or to a batch ``(b, g_dim,
        a_dim)`` of them."""
        QG, cache = entry.QG, entry.cache
        assert QG is not None  # callers check ready(entry) first
        kept = self.kept_columns(entry, damping)
        if kept is not None:
            return self.precondition_truncated(entry, grad, kept)
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
