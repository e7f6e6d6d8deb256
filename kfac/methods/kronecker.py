"""K-FAC: the Kronecker-factored curvature ``F_layer ~ A (x) G``.

For a gradient matrix ``V`` (``g_dim x a_dim``; ``vec`` is column-major, so ``(A (x) G) vec(V) = vec(G V A)``):

* ``"eigen"``: with ``A = QA diag(dA) QA^T`` and ``G = QG diag(dG) QG^T`` (eigenvalues clamped at 0),
  ``P(V) = QG [(QG^T V QA) / (dG dA^T + damping)] QA^T``, i.e. exactly ``(A (x) G + damping I)^-1 vec(V)``.
* ``"inverse"``: ``P(V) = (G + damping I)^-1 V (A + damping I)^-1`` with damping baked in at refresh time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..store import FactorEntry
from .base import DecompositionError, with_float64_retry

__all__ = ["EigenKFAC", "InverseKFAC", "make_method"]


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    d, q = torch.linalg.eigh(m)
    return d.clamp(min=0), q


def _damped_inverse(m: Tensor, damping: float, what: str = "factor") -> Tensor:
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)

    def inv(x: Tensor) -> Tensor:
        chol, info = torch.linalg.cholesky_ex(x + damping * eye.to(x.dtype))
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky failed (info={int(info)}): factor + damping is not positive definite")
        return torch.cholesky_inverse(chol)

    return with_float64_retry(inv, m, what)


def _require(entry: FactorEntry) -> None:
    if entry.A is None or entry.G is None:
        raise DecompositionError(f"layer {entry.name!r} has no factors yet")


class EigenKFAC:
    """Eigendecomposition method (default; KAISA ``compute_method='eigen'``)."""

    name = "eigen"

    def fields(self, entry: FactorEntry, factor: str) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
        """``(name, shape, symmetric)`` of the decomposition tensors of ``factor`` (what a refresh produces)."""
        if factor == "A":
            d = entry.a_dim
            return (("dA", (d,), False),) if entry.a_diagonal else (("QA", (d, d), False), ("dA", (d,), False))
        return (("QG", (entry.g_dim, entry.g_dim), False), ("dG", (entry.g_dim,), False))

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:
        """Decompose one factor; on failure its decomposition is cleared and :class:`DecompositionError` raised."""
        m = getattr(entry, factor)
        if m is None:
            raise DecompositionError(f"layer {entry.name!r} has no {factor} factor yet")
        try:
            if factor == "A" and entry.a_diagonal:
                if not torch.isfinite(m).all():
                    raise DecompositionError(f"A of {entry.name!r} has non-finite entries")
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

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        _require(entry)
        for factor in ("A", "G"):
            self.refresh_factor(entry, factor, damping=damping)

    def ready(self, entry: FactorEntry) -> bool:
        return entry.dA is not None and entry.QG is not None and entry.dG is not None and (
            entry.a_diagonal or entry.QA is not None)

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        QG, dG, dA = entry.QG, entry.dG, entry.dA
        v = QG.T @ grad.to(QG.dtype)
        if entry.QA is not None:
            v = v @ entry.QA
        v = v / (torch.outer(dG, dA) + damping)
        v = QG @ v
        if entry.QA is not None:
            v = v @ entry.QA.T
        return v


class InverseKFAC:
    """Explicit damped inverses (KAISA ``compute_method='inverse'``): half the preconditioning flops of eigen."""

    name = "inverse"

    def fields(self, entry: FactorEntry, factor: str) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
        if factor == "A":
            d = entry.a_dim
            return (("A_inv", (d,), False),) if entry.a_diagonal else (("A_inv", (d, d), True),)
        return (("G_inv", (entry.g_dim, entry.g_dim), True),)

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:
        m = getattr(entry, factor)
        if m is None:
            raise DecompositionError(f"layer {entry.name!r} has no {factor} factor yet")
        try:
            if factor == "A" and entry.a_diagonal:
                if not torch.isfinite(m).all():
                    raise DecompositionError(f"A of {entry.name!r} has non-finite entries")
                inv = 1.0 / (m + damping)
            else:
                inv = _damped_inverse(_symmetrise(m), damping, f"{factor} of {entry.name!r}")
        except DecompositionError:
            setattr(entry, f"{factor}_inv", None)
            raise
        setattr(entry, f"{factor}_inv", inv)

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        _require(entry)
        for factor in ("A", "G"):
            self.refresh_factor(entry, factor, damping=damping)

    def ready(self, entry: FactorEntry) -> bool:
        return entry.A_inv is not None and entry.G_inv is not None

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        v = entry.G_inv @ grad.to(entry.G_inv.dtype)
        return v * entry.A_inv if entry.a_diagonal else v @ entry.A_inv


def _symmetrise(m: Tensor) -> Tensor:
    return (m + m.T) / 2


def make_method(name: str) -> EigenKFAC | InverseKFAC:
    methods = {"eigen": EigenKFAC, "inverse": InverseKFAC}
    if name not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {name!r}")
    return methods[name]()
