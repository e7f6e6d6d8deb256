"""Pure-PyTorch reference implementations of the fused ops (they define the semantics) and the input validators
that both implementations share.

The ``*_torch`` functions assume validated inputs: :mod:`kfac.ext.ops` checks them with the ``check_*`` functions
below (``ValueError``, or ``TypeError`` for a non-tensor) before choosing an implementation.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [  # noqa: RUF022 - grouped: reference ops, then validators
    "eigen_scale_torch", "pack_symmetric_many_torch", "packed_size", "sym_outer_pack_torch", "sym_outer_update_torch",
    "unpack_symmetric_many_torch",
    "check_buffer", "check_dims", "check_float", "check_like", "check_many", "check_ndim", "check_square",
]


# ---- validation (shared by both implementations) -------------------------------------------------------------------

def check_float(t: Any, name: str) -> None:
    """``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_like(t: Any, ref: Tensor, name: str, ref_name: str) -> None:
    """``t`` is a floating-point tensor with the dtype and device of ``ref``."""
    check_float(t, name)
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_ndim(t: Tensor, ndim: int, name: str) -> None:
    """``t`` has ``ndim`` dimensions."""
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_square(t: Tensor, d: int, name: str) -> None:
    """``t`` is a square matrix, ``d x d`` unless ``d < 0``."""
    if t.dim() != 2 or t.shape[0] != t.shape[1] or (d >= 0 and t.shape[0] != d):
        want = f"{d} x {d}" if d >= 0 else "square"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def check_buffer(buffer: Any, ref: Tensor, offset: int, needed: int, name: str = "buffer") -> None:
    """``buffer`` is a contiguous 1-D tensor like ``ref`` with ``needed`` elements from ``offset`` on."""
    check_like(buffer, ref, name, "the input")
    check_ndim(buffer, 1, name)
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + needed > buffer.numel():
        raise ValueError(f"{name} too small: {needed} elements needed at offset {offset}, "
                         f"but it has {buffer.numel()}")


def check_many(mats: Sequence[Tensor], scales: Sequence[float] | None) -> None:
    """``mats`` are one or more square matrices of one dtype and device; ``scales``, if given, one per matrix."""
    if len(mats) == 0:
        raise ValueError("pack_symmetric_many needs at least one matrix")
    check_float(mats[0], "matrix 0")
    for k, m in enumerate(mats):
        check_like(m, mats[0], f"matrix {k}", "matrix 0")
        check_square(m, -1, f"matrix {k}")
    if scales is not None and len(scales) != len(mats):
        raise ValueError(f"got {len(scales)} scales for {len(mats)} matrices")


def check_dims(dims: Sequence[int]) -> list[int]:
    """``dims`` as a list of non-negative ``int`` (anything with ``__index__`` but ``bool``)."""
    out = []
    for d in dims:
        try:
            value = operator.index(d)
        except TypeError:
            value = -1
        if isinstance(d, bool) or value < 0:
            raise ValueError(f"dims must be non-negative integers, got {d!r}")
        out.append(value)
    return out


# ---- packed symmetric matrices --------------------------------------------------------------------------------------

def packed_size(d: int) -> int:
    """Elements of a packed ``d x d`` upper triangle: ``d (d + 1) / 2``."""
    return d * (d + 1) // 2


def _triu_pack(m: Tensor) -> Tensor:
    d = m.shape[0]
    i, j = torch.triu_indices(d, d, device=m.device)
    return m[i, j]


def _triu_unpack(v: Tensor, d: int) -> Tensor:
    i, j = torch.triu_indices(d, d, device=v.device)
    m = torch.empty(d, d, dtype=v.dtype, device=v.device)
    m[i, j] = v
    m[j, i] = v
    return m


# ---- reference ops --------------------------------------------------------------------------------------------------

def sym_outer_update_torch(x: Tensor, out: Tensor | None = None, *, alpha: float = 1.0,
                           beta: float = 1.0) -> Tensor:
    """PyTorch implementation of :func:`~kfac.ext.sym_outer_update` (one full ``x^T x`` product)."""
    if out is None:
        s = torch.mm(x.T, x)
        return s if alpha == 1 else s.mul_(alpha)
    return out.addmm_(x.T, x, beta=beta, alpha=alpha)


def sym_outer_pack_torch(x: Tensor, buffer: Tensor, offset: int = 0, *, alpha: float = 1.0,
                         beta: float = 0.0) -> Tensor:
    """PyTorch implementation of :func:`~kfac.ext.sym_outer_pack` (matmul, then a gather of the upper triangle)."""
    packed = _triu_pack(torch.mm(x.T, x))
    if alpha != 1:
        packed.mul_(alpha)
    view = buffer[offset:offset + packed.numel()]
    return view.copy_(packed) if beta == 0 else view.mul_(beta).add_(packed)


def pack_symmetric_many_torch(mats: Sequence[Tensor], scales: Sequence[float] | None = None, *,
                              out: Tensor | None = None, offset: int = 0) -> Tensor:
    """PyTorch implementation of :func:`~kfac.ext.pack_symmetric_many` (a gather per matrix, then one
    concatenation)."""
    parts = [_triu_pack(m) for m in mats]
    if scales is not None:
        parts = [p if s == 1 else p.mul_(s) for p, s in zip(parts, scales)]
    flat = torch.cat(parts)
    if out is None:
        return flat
    out[offset:offset + flat.numel()].copy_(flat)
    return out


def unpack_symmetric_many_torch(flat: Tensor, dims: Sequence[int], *, offset: int = 0) -> list[Tensor]:
    """PyTorch implementation of :func:`~kfac.ext.unpack_symmetric_many` (a scatter per matrix)."""
    out = []
    for d in dims:
        n = packed_size(d)
        out.append(_triu_unpack(flat[offset:offset + n], d))
        offset += n
    return out


def eigen_scale_torch(v: Tensor, d_g: Tensor, d_a: Tensor, damping: float, *, acc: Tensor | None = None) -> Tensor:
    """PyTorch implementation of :func:`~kfac.ext.eigen_scale`."""
    out = v / (torch.outer(d_g, d_a) + damping)
    if acc is not None:
        acc.addcmul_(v, v)
    return out
