"""Inverse K-FAC (KAISA ``compute_method='inverse'``): ``P(V) = (G + damping I)^-1 V (A + damping I)^-1`` with the
damping baked in at refresh time; half the preconditioning flops of eigen."""

from __future__ import annotations

import torch
from torch import Tensor

from ..store import FactorEntry
from .base import DecompositionError, KroneckerMethod
from .structure import damped_inverse, factor_of, left, right, symmetrise

__all__ = ["InverseKFAC"]


class InverseKFAC(KroneckerMethod):
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
            m = factor_of(entry, factor)
            if factor == "A" and entry.a_diagonal:
                inv = 1.0 / (m + damping)
            else:
                inv = damped_inverse(symmetrise(m), damping, f"{factor} of {entry.name!r}")
        except DecompositionError:
            setattr(entry, f"{factor}_inv", None)
            raise
        setattr(entry, f"{factor}_inv", inv)

    def ready(self, entry: FactorEntry) -> bool:
        return entry.A_inv is not None and entry.G_inv is not None

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        assert entry.G_inv is not None and entry.A_inv is not None  # callers check ready(entry) first
        v = left(entry.G_inv, grad.to(entry.G_inv.dtype), entry.cache, "G_inv")
        return v * entry.A_inv if entry.a_diagonal else right(v, entry.A_inv, entry.cache, "A_inv")

    def diag(self, entry: FactorEntry, *, damping: float) -> Tensor:
        """Diagonal of ``G_inv (x) A_inv`` (the damping baked in at the last refresh)."""
        assert entry.G_inv is not None and entry.A_inv is not None  # callers check ready(entry) first
        a = entry.A_inv if entry.a_diagonal else entry.A_inv.diagonal()
        return torch.outer(entry.G_inv.diagonal(), a)
