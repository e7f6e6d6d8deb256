"""K-FAC: the Kronecker-factored curvature ``F_layer ~ A (x) G``.

For a gradient matrix ``V`` (``g_dim x a_dim``; ``vec`` is column-major, so ``(A (x) G) vec(V) = vec(G V A)``):

* ``"eigen"``: with ``A = QA diag(dA) QA^T`` and ``G = QG diag(dG) QG^T`` (eigenvalues clamped at 0),
  ``P(V) = QG [(QG^T V QA) / (dG dA^T + damping)] QA^T``, i.e. exactly ``(A (x) G + damping I)^-1 vec(V)``.
* ``"inverse"``: ``P(V) = (G + damping I)^-1 V (A + damping I)^-1`` with damping baked in at refresh time.

Exact block structure: a coordinate whose off-diagonal row of a factor is exactly zero is a 1x1 diagonal block
(e.g. kernel taps that only ever see zero padding -- 8 of 9 taps of a 3x3 convolution at 1x1 spatial size -- or
dead units). Such a factor is ``blockdiag(F_cc, diag(f_dd))`` up to a permutation, so it is decomposed block-wise
(``eigh``/Cholesky of ``F_cc`` only) and applied block-wise; the decompositions keep their full shapes (the
decoupled part is an identity / a diagonal) and the result is the same linear map, computed with fewer flops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import ext
from ..store import FactorEntry
from .base import DecompositionError, with_float64_retry

__all__ = ["EigenKFAC", "InverseKFAC", "make_method"]


_MIN_DECOUPLED_FRACTION = 0.25  # below this, block-wise work saves too little to be worth the index traffic


def _decoupled(m: Tensor) -> Tensor | None:
    """Mask of coordinates whose off-diagonal row (and column) of the symmetric ``m`` is exactly zero, or
    ``None`` when too few are (then dense code is used)."""
    nonzero = m != 0
    mask = (nonzero.sum(1) - nonzero.diagonal().to(torch.int64)) == 0
    return mask if int(mask.sum()) >= _MIN_DECOUPLED_FRACTION * m.shape[0] else None


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors; decoupled coordinates are their own eigenvectors."""
    mask = _decoupled(m)
    if mask is None:
        d, q = torch.linalg.eigh(m)
        return d.clamp(min=0), q
    c = (~mask).nonzero().squeeze(1)
    d = m.diagonal().clone()
    q = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    if c.numel():
        dc, qc = torch.linalg.eigh(m[c][:, c])
        d[c] = dc
        q[c.unsqueeze(1), c.unsqueeze(0)] = qc
    return d.clamp(min=0), q


class _Structure:
    """Block structure of a decomposition matrix ``M`` (``Q`` or an inverse): coupled indices ``c`` with the
    dense block ``M[c][:, c]``, and decoupled indices ``d`` where ``M`` is diagonal with values ``diag``."""

    def __init__(self, m: Tensor, mask: Tensor) -> None:
        self.source = m
        self.c = (~mask).nonzero().squeeze(1)
        self.d = mask.nonzero().squeeze(1)
        self.block = m[self.c][:, self.c].contiguous()
        self.diag = m.diagonal()[self.d]

    @staticmethod
    def of(m: Tensor, cache: dict, key: str) -> "_Structure | None":
        """Structure of ``m`` (cached per decomposition: recomputed only when ``m`` is a new tensor)."""
        hit = cache.get(key)
        if hit is not None and hit[0] is m:
            return hit[1]
        nonzero = m != 0
        single = (nonzero.sum(0) == 1) & (nonzero.sum(1) == 1) & nonzero.diagonal()
        mask = single if int(single.sum()) >= _MIN_DECOUPLED_FRACTION * m.shape[0] else None
        out = _Structure(m, mask) if mask is not None else None
        cache[key] = (m, out)
        return out

    def right(self, v: Tensor, transpose: bool = False) -> Tensor:
        """``v @ M`` (or ``v @ M^T``) for ``v`` of shape ``(rows, n)``."""
        out = torch.empty_like(v)
        out[:, self.d] = v[:, self.d] * self.diag
        out[:, self.c] = v[:, self.c] @ (self.block.T if transpose else self.block)
        return out

    def left(self, v: Tensor, transpose: bool = False) -> Tensor:
        """``M @ v`` (or ``M^T @ v``) for ``v`` of shape ``(n, cols)``."""
        out = torch.empty_like(v)
        out[self.d] = v[self.d] * self.diag[:, None]
        out[self.c] = (self.block.T if transpose else self.block) @ v[self.c]
        return out


def _right(v: Tensor, m: Tensor, cache: dict, key: str, transpose: bool = False) -> Tensor:
    """``v @ M`` (or ``M^T``) for ``v`` of shape ``(rows, n)`` or a batch ``(b, rows, n)``."""
    s = _Structure.of(m, cache, key)
    if s is None:
        return v @ (m.T if transpose else m)
    flat = v.reshape(-1, v.shape[-1])
    return s.right(flat, transpose).reshape(v.shape)


def _left(m: Tensor, v: Tensor, cache: dict, key: str, transpose: bool = False) -> Tensor:
    """``M @ v`` (or ``M^T``) for ``v`` of shape ``(n, cols)`` or a batch ``(b, n, cols)``."""
    s = _Structure.of(m, cache, key)
    if s is None:
        return (m.T if transpose else m) @ v
    if v.dim() == 2:
        return s.left(v, transpose)
    b, n, cols = v.shape  # M acts on dim 1: (n, b * cols)
    out = s.left(v.transpose(0, 1).reshape(n, b * cols), transpose)
    return out.reshape(n, b, cols).transpose(0, 1)


def _damped_inverse(m: Tensor, damping: float, what: str = "factor") -> Tensor:
    def dense_inv(x: Tensor) -> Tensor:
        eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        chol, info = torch.linalg.cholesky_ex(x + damping * eye)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky failed (info={int(info)}): factor + damping is not positive definite")
        return torch.cholesky_inverse(chol)

    def inv(x: Tensor) -> Tensor:
        mask = _decoupled(x)
        if mask is None:
            return dense_inv(x)
        diag = x.diagonal() + damping
        if bool((diag <= 0).any()):
            raise torch.linalg.LinAlgError("factor + damping is not positive definite")
        out = torch.diag(1.0 / diag)
        c = (~mask).nonzero().squeeze(1)
        if c.numel():
            out[c.unsqueeze(1), c.unsqueeze(0)] = dense_inv(x[c][:, c])
        return out

    return with_float64_retry(inv, m, what)


def _factor(entry: FactorEntry, factor: str) -> Tensor:
    """The running factor to decompose (a diagonal ``A`` is checked here; matrices by the float64 retry)."""
    m = getattr(entry, factor)
    if m is None:
        raise DecompositionError(f"layer {entry.name!r} has no {factor} factor yet")
    if factor == "A" and entry.a_diagonal and not torch.isfinite(m).all():
        raise DecompositionError(f"A of {entry.name!r} has non-finite entries")
    return m


def _require(entry: FactorEntry) -> None:
    if entry.A is None or entry.G is None:
        raise DecompositionError(f"layer {entry.name!r} has no factors yet")


class _KroneckerMethod:
    """What the Kronecker methods share: a full refresh is one refresh per factor; no eigenvalue corrections."""

    corrects = False       # EK-FAC re-estimates eigenvalues from per-example gradients
    bakes_damping = False  # the damping is fixed into the decompositions at refresh time

    def reset_corrections(self, entry: FactorEntry) -> None:
        """Restart eigenvalue corrections (nothing to do without corrections)."""

    def correction_sum(self, entry: FactorEntry, a: Tensor, g: Tensor) -> Tensor | None:
        """Per-example projections for eigenvalue corrections (``None``: this method keeps no corrections)."""
        return None

    def update_corrections(self, entry: FactorEntry, batch: Tensor, decay: float) -> None:
        """Blend a batch estimate into the corrections (nothing to do without corrections)."""

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:  # pragma: no cover
        raise NotImplementedError

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        _require(entry)
        for factor in ("A", "G"):
            self.refresh_factor(entry, factor, damping=damping)


class EigenKFAC(_KroneckerMethod):
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
            m = _factor(entry, factor)
            if factor == "A" and entry.a_diagonal:
                entry.QA, entry.dA = None, m.clamp(min=0)
                return
            d, q = with_float64_retry(_eigh, _symmetrise(m), f"{factor} of {entry.name!r}")
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
        return torch.outer(entry.dG, entry.dA)

    def scale(self, entry: FactorEntry, v: Tensor, damping: float) -> Tensor:
        """``v / (eigenvalues + damping)`` in the eigenbasis (fused by :func:`kfac.ext.eigen_scale`; a batch
        ``(b, g_dim, a_dim)`` broadcasts)."""
        if v.dim() == 2 and ext.uses_extension("eigen_scale", v, v.numel()):
            return ext.eigen_scale(v, entry.dG, entry.dA, damping)
        # One multiply by 1 / (eigenvalues + damping), cached until the decomposition or the damping changes
        # (instead of outer, add and divide at every step: fewer kernel launches on a GPU).
        hit = entry.cache.get("inv_eigenvalues")
        if hit is None or hit[0] is not entry.dG or hit[1] is not entry.dA or hit[2] != damping:
            hit = (entry.dG, entry.dA, damping, (self.eigenvalues(entry) + damping).reciprocal_())
            entry.cache["inv_eigenvalues"] = hit
        return v * hit[3]

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        """The damped inverse applied to a ``(g_dim, a_dim)`` gradient matrix, or to a batch ``(b, g_dim,
        a_dim)`` of them."""
        QG, cache = entry.QG, entry.cache
        v = _left(QG, grad.to(QG.dtype), cache, "QG", transpose=True)
        if entry.QA is not None:
            v = _right(v, entry.QA, cache, "QA")
        v = self.scale(entry, v, damping)
        v = _left(QG, v, cache, "QG")
        if entry.QA is not None:
            v = _right(v, entry.QA, cache, "QA", transpose=True)
        return v

    def diag(self, entry: FactorEntry, *, damping: float) -> Tensor:
        """Diagonal of the damped inverse, ``diag(P)[i, j] = sum_kl QG[i,k]^2 QA[j,l]^2 / (eig[k,l] + damping)``."""
        inv = 1.0 / (self.eigenvalues(entry) + damping)
        out = entry.QG.square() @ inv
        return out if entry.QA is None else out @ entry.QA.square().T


class InverseKFAC(_KroneckerMethod):
    """Explicit damped inverses (KAISA ``compute_method='inverse'``): half the preconditioning flops of eigen."""

    name = "inverse"
    decomposition = "inverse"
    bakes_damping = True

    def fields(self, entry: FactorEntry, factor: str) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
        if factor == "A":
            d = entry.a_dim
            return (("A_inv", (d,), False),) if entry.a_diagonal else (("A_inv", (d, d), True),)
        return (("G_inv", (entry.g_dim, entry.g_dim), True),)

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:
        try:
            m = _factor(entry, factor)
            if factor == "A" and entry.a_diagonal:
                inv = 1.0 / (m + damping)
            else:
                inv = _damped_inverse(_symmetrise(m), damping, f"{factor} of {entry.name!r}")
        except DecompositionError:
            setattr(entry, f"{factor}_inv", None)
            raise
        setattr(entry, f"{factor}_inv", inv)

    def ready(self, entry: FactorEntry) -> bool:
        return entry.A_inv is not None and entry.G_inv is not None

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        v = _left(entry.G_inv, grad.to(entry.G_inv.dtype), entry.cache, "G_inv")
        return v * entry.A_inv if entry.a_diagonal else _right(v, entry.A_inv, entry.cache, "A_inv")

    def diag(self, entry: FactorEntry, *, damping: float) -> Tensor:
        """Diagonal of ``G_inv (x) A_inv`` (the damping baked in at the last refresh)."""
        a = entry.A_inv if entry.a_diagonal else entry.A_inv.diagonal()
        return torch.outer(entry.G_inv.diagonal(), a)


def _symmetrise(m: Tensor) -> Tensor:
    return (m + m.T) / 2


def make_method(name: str) -> EigenKFAC | InverseKFAC:
    from .ekfac import EigenCorrectedKFAC

    methods = {"eigen": EigenKFAC, "inverse": InverseKFAC, "ekfac": EigenCorrectedKFAC}
    if name not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {name!r}")
    return methods[name]()
