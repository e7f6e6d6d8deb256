"""Warm-started eigenbasis refresh: the previous eigenbasis, checked and refined, instead of a new ``eigh``.

Between refreshes a running factor ``F`` changes little, so its previous eigenbasis ``Q`` nearly diagonalises it.
In that basis ``B = Q^T F Q = D + E`` (``D`` its diagonal, the Rayleigh quotients; ``E`` the rest), and keeping
``Q`` with the eigenvalues ``D`` changes the damped inverse the preconditioner applies by::

    err = || S E S ||_2,    S = (D + δ)^(-1/2):    || (D + δ)^½ [(D + δ)^-1 - (B + δ)^-1] (D + δ)^½ ||_2 <= err / (1 - err)

-- a relative error in the metric of the damped eigenvalues (``(D + δ)^-1 - (B + δ)^-1 = S [I - (I + SES)^-1] S``).
``δ`` is the damping as this factor sees it: K-FAC damps the Kronecker product, ``dG_i dA_j + λ``, so for ``A`` the
smallest relative damping any direction gets is ``δ_A = λ / max(dG)`` (and ``δ_G = λ / max(dA)``); where the other
factor is not known, or as a lower bound, ``δ = floor * max(D)``. Couplings between directions far below ``δ`` do
not matter, which is why old bases stay good for a long time under K-FAC's damping.

A refresh computes ``F Q`` (one matrix product), ``D`` from it, and ``err`` by power iteration with matrix-vector
products only. When ``err <= tol`` it keeps ``Q`` with ``D`` (clamped at 0). When ``err`` is close to ``tol``
(``err <= 2 tol``, where first-order perturbation theory can close the gap), a Jacobi-like correction follows: the
eigenvector near column ``j`` is ``e_j + Σ_i e_i E_ij / (D_j - D_i)``, an antisymmetric ``K`` made exactly orthogonal
by the Cayley transform ``C = (I - K/2)^-1 (I + K/2)``, ``Q <- Q C`` (pairs with ``|D_j - D_i| < 4 |E_ij|`` are left
alone: first order does not hold there), and ``err`` is measured again, up to ``max_iters`` times. Otherwise --
the factor jumped -- a full ``eigh`` is computed. The first refresh of a factor has no previous basis and is exact.
A factor whose warm refresh fell back ``k`` times in a row goes straight to ``eigh`` for its next
``min(2^(k-1), 8)`` refreshes (the check would be wasted while it keeps changing fast), then is tried again.

Cost: the check is one ``d x d`` product, a correction about four more. On a 2-core CPU ``eigh`` of a real
K-FAC factor costs only 2-3 such products (LAPACK's divide and conquer), so the warm start saves at most that
factor there; on a GPU ``eigh`` costs far more than a product.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["WARM_REFRESH_FRACTION", "WarmStart", "WarmRefresher", "preconditioning_error"]

_POWER_STEPS = 30
_MAX_SKIP = 8

WARM_REFRESH_FRACTION = 0.3
"""What the planner's cost model (GPU constants) charges for a warm-started refresh, as a fraction of an ``eigh``:
an estimate -- a kept basis costs one product where cuSOLVER's ``eigh`` costs tens, fallbacks cost both -- not yet
measured on a GPU (``benchmarks/cpu/warm_refresh.py --device cuda``); on a 2-core CPU the measured ratio is above
1 (see the README)."""


@dataclass(frozen=True)
class WarmStart:
    """Settings of the warm-started refresh (see :mod:`kfac.kronecker.methods.warm`); validated on construction."""

    tol: float = 0.05
    """Largest accepted ``err``, the first-order relative error of the factor's damped inverse."""
    floor: float = 1e-4
    """``δ >= floor * max eigenvalue``: a lower bound on the damping level (and ``δ`` where it is not known)."""
    max_iters: int = 1
    """Jacobi-like corrections before falling back to ``eigh``."""

    def __post_init__(self) -> None:
        for name in ("tol", "floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"WarmStart.{name} must be in (0, 1), got {value!r}")
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int) or self.max_iters < 0:
            raise ValueError(f"WarmStart.max_iters must be a non-negative int, got {self.max_iters!r}")


def preconditioning_error(b: Tensor, floor: float, delta: float | None = None) -> float:
    """``err = ||S E S||_2`` of a rotated factor ``b`` (``δ = max(delta, floor * max(D))``)."""
    return _error(lambda x: b @ x, b.diagonal(), floor, delta)


def _error(apply: Callable[[Tensor], Tensor], diag: Tensor, floor: float, delta: float | None) -> float:
    """``||S (B - D) S||_2`` with ``apply(x) = B x`` and ``diag = D``, by power iteration on its square from a
    fixed start (deterministic); 0 when ``B`` is diagonal."""
    d = diag.clamp(min=0)
    level = max(floor * float(d.max()) if d.numel() else 0.0, delta or 0.0)
    if level <= 0.0:
        return 0.0
    s = (d + level).rsqrt()

    def e(v: Tensor) -> Tensor:
        u = s * v
        return s * (apply(u) - diag * u)

    x = torch.linspace(1.0, 2.0, d.shape[0], dtype=d.dtype, device=d.device)
    x = x / torch.linalg.vector_norm(x)
    norm = 0.0
    for _ in range(_POWER_STEPS):
        y = e(e(x))  # symmetric: power iteration on the square finds |largest eigenvalue|^2
        n = float(torch.linalg.vector_norm(y))
        if n == 0.0:
            return 0.0
        x, norm = y / n, n
    return norm ** 0.5


def jacobi_rotation(b: Tensor) -> Tensor:
    """The orthogonal ``C`` (Cayley transform of the first-order correction ``K``) that nearly diagonalises ``b``."""
    d = b.diagonal()
    gap = d[None, :] - d[:, None]  # gap[i, j] = D_j - D_i
    e = b - torch.diag_embed(d)
    ok = gap.abs() >= 4 * e.abs()
    k = torch.where(ok, e / torch.where(ok, gap, torch.ones_like(gap)), torch.zeros_like(e))
    k.fill_diagonal_(0)
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    return torch.linalg.solve(eye - k / 2, eye + k / 2)


@dataclass
class WarmRefresher:
    """Refines a previous eigenbasis of a symmetric factor, or says it cannot (``None``: compute ``eigh``).

    ``counts`` tallies the outcomes: ``"kept"`` (previous basis accepted), ``"corrected"`` (accepted after
    corrections; ``"corrections"`` counts them), ``"fallback"`` (``eigh`` needed) and ``"skipped"`` (``eigh``
    straight away, backing off after fallbacks)."""

    config: WarmStart
    counts: Counter[str] = field(default_factory=Counter)
    last_error: float | None = None
    """The ``err`` last measured (for diagnostics and benchmarks)."""
    backoff: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per factor key: ``(consecutive fallbacks, refreshes still to skip)``."""

    def attempt(self, key: str) -> bool:
        """Whether to try a warm refresh of the factor ``key`` now (``False`` while it backs off after fallbacks;
        counted as ``"skipped"``)."""
        fails, skip = self.backoff.get(key, (0, 0))
        if skip > 0:
            self.backoff[key] = (fails, skip - 1)
            self.counts["skipped"] += 1
            return False
        return True

    def record(self, key: str, kept: bool) -> None:
        """Update the backoff of ``key`` after a warm attempt."""
        if kept:
            self.backoff.pop(key, None)
            return
        fails = self.backoff.get(key, (0, 0))[0] + 1
        self.backoff[key] = (fails, min(2 ** (fails - 1), _MAX_SKIP))

    def refine(self, m: Tensor, q: Tensor, delta: float | None = None) -> tuple[Tensor, Tensor] | None:
        """``(eigenvalues clamped at 0, eigenvectors)`` of ``m`` from the previous eigenvectors ``q``; ``delta``:
        the damping level of this factor (see the module docstring)."""
        if q.shape != m.shape or q.dtype != m.dtype or q.device != m.device:
            return None
        tol, floor = self.config.tol, self.config.floor
        for step in range(self.config.max_iters + 1):
            w = m @ q
            d = (q * w).sum(0)  # Rayleigh quotients: diag(Q^T M Q)
            if not bool(torch.isfinite(d).all()):
                break
            err = _error(lambda x: q.T @ (w @ x), d, floor, delta)
            self.last_error = err
            if err <= tol:
                self.counts["kept" if step == 0 else "corrected"] += 1
                self.counts["corrections"] += step
                return d.clamp(min=0), q
            if step == self.config.max_iters or err > 2 * tol:
                break
            b = q.T @ w
            q = q @ jacobi_rotation((b + b.T) / 2)
        self.counts["fallback"] += 1
        return None
