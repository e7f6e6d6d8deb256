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


def _damped_inverse(m: Tensor, damping: float) -> Tensor:
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)

    def inv(x: Tensor) -> Tensor:
        chol, info = torch.linalg.cholesky_ex(x + damping * eye.to(x.dtype))
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky failed (info={int(info)}): factor + damping is not positive definite")
        return torch.cholesky_inverse(chol)

    return with_float64_retry(inv, m, "factor")


def _require(entry: FactorEntry) -> None:
    if entry.A is None or entry.G is None:
        raise DecompositionError(f"layer {entry.name!r} has no factors yet")


class EigenKFAC:
    """Eigendecomposition method (default; KAISA ``compute_method='eigen'``)."""

    name = "eigen"

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        _require(entry)
        if entry.a_diagonal:
            if not torch.isfinite(entry.A).all():
                raise DecompositionError(f"A of {entry.name!r} has non-finite entries")
            dA, QA = entry.A.clamp(min=0), None
        else:
            dA, QA = with_float64_retry(_eigh, _symmetrise(entry.A), f"A of {entry.name!r}")
        dG, QG = with_float64_retry(_eigh, _symmetrise(entry.G), f"G of {entry.name!r}")
        entry.clear_decompositions()
        entry.QA, entry.dA, entry.QG, entry.dG = QA, dA, QG, dG

    def ready(self, entry: FactorEntry) -> bool:
        return entry.dA is not None and entry.QG is not None

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

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        _require(entry)
        if entry.a_diagonal:
            if not torch.isfinite(entry.A).all():
                raise DecompositionError(f"A of {entry.name!r} has non-finite entries")
            A_inv = 1.0 / (entry.A + damping)
        else:
            A_inv = _damped_inverse(_symmetrise(entry.A), damping)
        G_inv = _damped_inverse(_symmetrise(entry.G), damping)
        entry.clear_decompositions()
        entry.A_inv, entry.G_inv = A_inv, G_inv

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
