"""Linear algebra shared by the Kronecker methods: clamped eigendecompositions, damped inverses, and the exact
block structure of factors whose coordinates decouple (see :mod:`kfac.kronecker.methods.eigen`).

Exact block structure: a coordinate whose off-diagonal row of a factor is exactly zero is a 1x1 diagonal block
(e.g. kernel taps that only ever see zero padding -- 8 of 9 taps of a 3x3 convolution at 1x1 spatial size -- or
dead units). Such a factor is ``blockdiag(F_cc, diag(f_dd))`` up to a permutation, so it is decomposed block-wise
(``eigh``/Cholesky of ``F_cc`` only) and applied block-wise; the decompositions keep their full shapes (the
decoupled part is an identity / a diagonal) and the result is the same linear map, computed with fewer flops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..store import FactorEntry
from .base import DecompositionError, with_float64_retry

__all__ = ["decoupled", "eigh_clamped", "Structure", "right", "left", "damped_inverse", "factor_of",
           "symmetrise"]


MIN_DECOUPLED_FRACTION = 0.25  # below this, block-wise work saves too little to be worth the index traffic


def decoupled(m: Tensor) -> Tensor | None:
    """Mask of coordinates whose off-diagonal row (and column) of the symmetric ``m`` is exactly zero, or
    ``None`` when too few are (then dense code is used)."""
    nonzero = m != 0
    mask = (nonzero.sum(1) - nonzero.diagonal().to(torch.int64)) == 0
    return mask if int(mask.sum()) >= MIN_DECOUPLED_FRACTION * m.shape[0] else None


def eigh_clamped(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors; decoupled coordinates are their own eigenvectors."""
    mask = decoupled(m)
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


class Structure:
    """Block structure of a decomposition matrix ``M`` (``Q`` or an inverse): coupled indices ``c`` with the
    dense block ``M[c][:, c]``, and decoupled indices ``d`` where ``M`` is diagonal with values ``diag``."""

    def __init__(self, m: Tensor, mask: Tensor) -> None:
        self.source = m
        self.c = (~mask).nonzero().squeeze(1)
        self.d = mask.nonzero().squeeze(1)
        self.block = m[self.c][:, self.c].contiguous()
        self.diag = m.diagonal()[self.d]

    @staticmethod
    def of(m: Tensor, cache: dict, key: str) -> "Structure | None":
        """Structure of ``m`` (cached per decomposition: recomputed only when ``m`` is a new tensor)."""
        hit = cache.get(key)
        if hit is not None and hit[0] is m:
            return hit[1]
        nonzero = m != 0
        single = (nonzero.sum(0) == 1) & (nonzero.sum(1) == 1) & nonzero.diagonal()
        mask = single if int(single.sum()) >= MIN_DECOUPLED_FRACTION * m.shape[0] else None
        out = Structure(m, mask) if mask is not None else None
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


def right(v: Tensor, m: Tensor, cache: dict, key: str, transpose: bool = False) -> Tensor:
    """``v @ M`` (or ``M^T``) for ``v`` of shape ``(rows, n)`` or a batch ``(b, rows, n)``."""
    s = Structure.of(m, cache, key)
    if s is None:
        return v @ (m.T if transpose else m)
    flat = v.reshape(-1, v.shape[-1])
    return s.right(flat, transpose).reshape(v.shape)


def left(m: Tensor, v: Tensor, cache: dict, key: str, transpose: bool = False) -> Tensor:
    """``M @ v`` (or ``M^T``) for ``v`` of shape ``(n, cols)`` or a batch ``(b, n, cols)``."""
    s = Structure.of(m, cache, key)
    if s is None:
        return (m.T if transpose else m) @ v
    if v.dim() == 2:
        return s.left(v, transpose)
    b, n, cols = v.shape  # M acts on dim 1: (n, b * cols)
    out = s.left(v.transpose(0, 1).reshape(n, b * cols), transpose)
    return out.reshape(n, b, cols).transpose(0, 1)


def damped_inverse(m: Tensor, damping: float, what: str = "factor") -> Tensor:
    def dense_inv(x: Tensor) -> Tensor:
        eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        chol, info = torch.linalg.cholesky_ex(x + damping * eye)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky failed (info={int(info)}): factor + damping is not positive definite")
        return torch.cholesky_inverse(chol)

    def inv(x: Tensor) -> Tensor:
        mask = decoupled(x)
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


def factor_of(entry: FactorEntry, factor: str) -> Tensor:
    """The running factor to decompose (a diagonal ``A`` is checked here; matrices by the float64 retry)."""
    m = getattr(entry, factor)
    if m is None:
        raise DecompositionError(f"layer {entry.name!r} has no {factor} factor yet")
    if factor == "A" and entry.a_diagonal and not torch.isfinite(m).all():
        raise DecompositionError(f"A of {entry.name!r} has non-finite entries")
    return m


def symmetrise(m: Tensor) -> Tensor:
    return (m + m.T) / 2
