"""EK-FAC (George et al., 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis").

K-FAC's curvature ``A (x) G = (QA (x) QG) diag(dA (x) dG) (QA (x) QG)^T`` keeps its eigenbasis but gets its
eigenvalues re-estimated from per-example gradient matrices ``V_n`` (``g_dim x a_dim``)::

    Lambda[i, j] = mean_n ( (QG^T V_n QA)[i, j]^2 ),        P(V) = QG [(QG^T V QA) / (Lambda + damping)] QA^T

the best diagonal in that basis (Frobenius distance to the empirical Fisher). ``V_n = sum_t g_nt a_nt^T`` sums the
``T`` rows (tokens, or convolution positions) of example ``n`` built by the layer's adapter (same rows and scaling
as ``A`` and ``G``). :meth:`EigenCorrectedKFAC.correction_sum` returns ``sum_n (QG^T V_n QA)^2``; for ``T = 1``
``V_n`` is never formed (``(gq^2)^T (aq^2)`` with ``gq = g QG``, ``aq = a QA``).

Conventions of the callers: influence queries use exactly ``mean_n`` above (per-example curvature). The optimizer
(:class:`kfac.KFACPreconditioner`) divides each example's term by its ``T``, which keeps ``Lambda`` in the per-row
units of ``A`` and ``G`` (with independent rows ``Lambda ~ dG dA^T``), so one damping means the same for K-FAC and
EK-FAC; for one row per example (MLPs) both are George et al.'s estimate.

``Lambda`` lives in ``entry.extras["Lambda"]``. In the optimizer it restarts from the K-FAC eigenvalues
``outer(dG, dA)`` after each refresh of the eigenbases (so before any correction EK-FAC *is* eigen K-FAC), and each
correction update blends in a batch estimate, ``Lambda <- decay Lambda + (1 - decay) Lambda_batch``, projected
during the backward pass onto the current eigenbases (as in George et al.'s algorithm; nothing per-example is
stored, and a step that refreshes the eigenbases applies no correction). Layers with a
diagonal ``A`` (embeddings) keep the K-FAC eigenvalues (their per-example gradients are ``g_dim x vocabulary``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..store import FactorEntry
from .eigen import EigenKFAC
from .structure import right

__all__ = ["EigenCorrectedKFAC"]

_CHUNK_ELEMENTS = 2**24  # per-example projections materialised at once (T > 1)


class EigenCorrectedKFAC(EigenKFAC):
    """Eigenvalue-corrected K-FAC over the eigen method's decompositions (``method="ekfac"``)."""

    name = "ekfac"
    corrects = True

    def eigenvalues(self, entry: FactorEntry) -> Tensor:
        """The curvature's eigenvalues in the Kronecker eigenbasis (``Lambda``, or ``outer(dG, dA)``)."""
        lam = entry.extras.get("Lambda")
        if lam is not None:
            return lam
        assert entry.dG is not None and entry.dA is not None  # callers check ready(entry) first
        return torch.outer(entry.dG, entry.dA)

    def scale(self, entry: FactorEntry, v: Tensor, damping: float) -> Tensor:
        return v / self.damped(self.eigenvalues(entry), damping)

    def reset_corrections(self, entry: FactorEntry) -> None:
        """Restart ``Lambda`` from the K-FAC eigenvalues (after the eigenbases changed)."""
        if self.ready(entry):
            assert entry.dG is not None and entry.dA is not None  # ready(entry)
            entry.extras["Lambda"] = torch.outer(entry.dG, entry.dA)
        else:
            entry.extras.pop("Lambda", None)

    def correction_sum(self, entry: FactorEntry, a: Tensor, g: Tensor) -> Tensor | None:
        """``sum_n (QG^T V_n QA)^2`` for per-example rows ``a`` (``N x T x a_dim``) and ``g`` (``N x T x g_dim``);
        ``None`` where the layer keeps its K-FAC eigenvalues."""
        if entry.a_diagonal or not self.ready(entry):
            return None
        assert entry.QA is not None and entry.QG is not None  # ready(entry) and not a_diagonal
        a = a.to(entry.QA.dtype)
        g = g.to(entry.QG.dtype)
        t = a.shape[1]
        aq = right(a.reshape(-1, a.shape[-1]), entry.QA, entry.cache, "QA").reshape(a.shape)
        gq = right(g.reshape(-1, g.shape[-1]), entry.QG, entry.cache, "QG").reshape(g.shape)
        if t == 1:
            return gq[:, 0].square().T @ aq[:, 0].square()
        total = torch.zeros(entry.g_dim, entry.a_dim, dtype=aq.dtype, device=aq.device)
        chunk = max(1, _CHUNK_ELEMENTS // (entry.g_dim * entry.a_dim))
        for i in range(0, a.shape[0], chunk):
            v = gq[i:i + chunk].transpose(1, 2) @ aq[i:i + chunk]  # (n, g_dim, a_dim) projected V_n
            total += v.square_().sum(0)
        return total

    def update_corrections(self, entry: FactorEntry, batch: Tensor, decay: float) -> None:
        """Blend a batch estimate into ``Lambda``."""
        lam = self.eigenvalues(entry)
        entry.extras["Lambda"] = torch.lerp(lam, batch.to(lam.dtype), 1 - decay)
