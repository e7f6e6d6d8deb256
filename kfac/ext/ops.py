"""The public fused ops and the dispatch between the compiled kernels and their PyTorch references.

Each op validates its inputs (:mod:`kfac.ext.reference`'s ``check_*``), then runs in the extension
(``torch.ops.kfac_ext``, loaded by :mod:`kfac.ext._loader`) when it is loaded and preferred for the device and size
(:data:`PREFERRED`, :func:`set_preferred`, :func:`backend`), and otherwise in its ``*_torch`` reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from . import _loader, reference
from .reference import (
    check_buffer,
    check_dims,
    check_float,
    check_like,
    check_many,
    check_ndim,
    check_square,
    packed_size,
)

__all__ = [  # noqa: RUF022 - grouped: dispatch control, fused ops
    "OPS", "PREFERRED", "Backend", "available", "backend", "info", "set_preferred", "uses_extension",
    "sym_outer_update", "sym_outer_pack", "pack_symmetric_many", "unpack_symmetric_many", "eigen_scale",
]

OPS = ("sym_outer_update", "sym_outer_pack", "pack_symmetric_many", "unpack_symmetric_many", "eigen_scale")

PREFERRED: dict[str, dict[str, int]] = {
    # Measured on CPU (benchmarks/cpu/fused_ops.py, benchmarks/cpu/results/fused_ops.json): the extension wins from these sizes on;
    # below them the call overhead outweighs the gain.
    "cpu": {"sym_outer_update": 2 ** 21, "sym_outer_pack": 32 * 32, "pack_symmetric_many": 0,
            "unpack_symmetric_many": 0, "eigen_scale": 2 ** 15},
    # Not measured on a GPU yet: PyTorch until benchmarks/cpu/fused_ops.py shows a win there (see set_preferred).
    "cuda": {},
}
"""Per device type: op -> the smallest problem size from which the extension is used by default (when loaded);
ops not listed always run on PyTorch. Sizes: for ``sym_outer_update`` the multiply-adds that the blocked product
skips, ``N d (d - 64) / 2`` (the rest is a plain matmul either way); ``d * d`` for ``sym_outer_pack``; the
matrices' total ``sum d_k^2`` for packing and unpacking; ``m * n`` for ``eigen_scale``."""

_EXT_DTYPES = (torch.float32, torch.float64)
Backend = Literal["auto", "extension", "torch"]


class _Dispatch:
    """Process-wide choice of implementation (set by :func:`backend`)."""

    def __init__(self) -> None:
        self.backend: Backend = "auto"


_dispatch = _Dispatch()


# ---- dispatch control -----------------------------------------------------------------------------------------------

def available() -> bool:
    """Whether the compiled extension is loaded (or, without compiling, loadable) and not disabled."""
    return _loader.loaded_ops() is not None


def info() -> dict[str, Any]:
    """Status of the extension: loaded library, last error, sources, build folder, preferences."""
    config = _loader.BuildConfig.default()
    return {
        "available": available(), "disabled": _loader.disabled(), "library": _loader.library_path(),
        "error": _loader.last_error(), "cuda_kernels": _loader.has_cuda_kernels(), "backend": _dispatch.backend,
        "sources": str(_loader.source_dir()), "build_dir": str(_loader.build_dir(config)), "torch": torch.__version__,
        "preferred": {k: dict(sorted(v.items())) for k, v in PREFERRED.items()},
        "build_info": torch.ops.kfac_ext.build_info() if _loader.library_path() is not None else None,
    }


@contextlib.contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Process-wide choice of implementation inside the block: ``"auto"`` (default: :data:`PREFERRED`),
    ``"extension"`` (the extension for every op it supports; raises if it is not available) or ``"torch"``."""
    if name not in ("auto", "extension", "torch"):
        raise ValueError(f"backend must be 'auto', 'extension' or 'torch', got {name!r}")
    if name == "extension" and _loader.loaded_ops() is None:
        raise RuntimeError("kfac.ext: the extension is not available "
                           f"({_loader.last_error() or 'not built or disabled'})")
    previous, _dispatch.backend = _dispatch.backend, name
    try:
        yield
    finally:
        _dispatch.backend = previous


def set_preferred(op: str, device_type: str, use_extension: bool, *, min_size: int = 0) -> None:
    """Use (from problems of ``min_size`` on) or stop using the extension for ``op`` on ``device_type``
    ("cpu", "cuda") under the "auto" backend; see :data:`PREFERRED`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    ops = PREFERRED.setdefault(device_type, {})
    if use_extension:
        ops[op] = int(min_size)
    else:
        ops.pop(op, None)


def uses_extension(op: str, t: Tensor, size: int) -> bool:
    """Whether ``op`` on tensors like ``t`` with problem ``size`` (as the op measures it, see :data:`PREFERRED`)
    would run in the extension under the current backend, rather than in its PyTorch fallback."""
    return _ext_for(op, t, size) is not None


def _ext_for(op: str, t: Tensor, size: int) -> Any | None:
    """The extension's op namespace if it should run ``op`` (problem ``size``, see PREFERRED) on tensors like ``t``."""
    mode = _dispatch.backend
    if mode == "torch" or t.dtype not in _EXT_DTYPES or t.device.type not in ("cpu", "cuda"):
        return None
    lib = _loader.loaded_ops()
    if lib is None or (t.device.type == "cuda" and not _loader.has_cuda_kernels()):
        return None
    if mode == "auto":
        threshold = PREFERRED.get(t.device.type, {}).get(op)
        if threshold is None or size < threshold:
            return None
    return lib


# ---- the fused ops (fallbacks are looked up on the reference module at call time) -----------------------------------

def sym_outer_update(x: Tensor, out: Tensor | None = None, *, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``S = beta * out + alpha * x^T x`` for rows ``x`` of shape ``(N, d)``; ``out`` (symmetric ``d x d``) is
    updated in place and returned. Without ``out``, returns a new ``alpha * x^T x`` (``beta`` unused).

    The extension multiplies only the blocks on and above the diagonal, reads only the upper triangle of ``out``
    (as BLAS ``syrk`` does) and mirrors the result, so it is exactly symmetric; the PyTorch path computes the full
    product (symmetric up to rounding). ``beta == 0`` ignores ``out``'s contents (NaN included).
    """
    check_float(x, "x")
    check_ndim(x, 2, "x")
    if out is not None:
        check_like(out, x, "out", "x")
        check_square(out, x.shape[1], "out")
    lib = _ext_for("sym_outer_update", x, x.shape[0] * x.shape[1] * max(x.shape[1] - 64, 0) // 2)
    if lib is None:
        return reference.sym_outer_update_torch(x, out, alpha=alpha, beta=beta)
    if out is None:
        return lib.sym_outer(x, float(alpha), 0)
    lib.sym_outer_update_(out, x, float(alpha), float(beta), 0)
    return out


def sym_outer_pack(x: Tensor, buffer: Tensor, offset: int = 0, *, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """``buffer[offset : offset + d(d+1)/2] = beta * (same) + alpha * pack(x^T x)``, ``pack`` being the row-major
    upper triangle; returns that slice. One pass replaces "matmul, symmetrise, pack, concatenate": the packed form
    is symmetric by construction. ``beta == 0`` overwrites (the old contents are never read)."""
    check_float(x, "x")
    check_ndim(x, 2, "x")
    n = packed_size(x.shape[1])
    check_buffer(buffer, x, offset, n)
    lib = _ext_for("sym_outer_pack", x, x.shape[1] ** 2)
    if lib is None:
        return reference.sym_outer_pack_torch(x, buffer, offset, alpha=alpha, beta=beta)
    lib.sym_outer_pack_(buffer, int(offset), x, float(alpha), float(beta), 0)
    return buffer[offset:offset + n]


def pack_symmetric_many(mats: Sequence[Tensor], scales: Sequence[float] | None = None, *,
                        out: Tensor | None = None, offset: int = 0) -> Tensor:
    """One flat buffer of the packed upper triangles of ``mats`` (each symmetric ``d_k x d_k``), in order, each
    multiplied by ``scales[k]`` (default 1): ``[s_0 pack(M_0), s_1 pack(M_1), ...]``. Written to
    ``out[offset:]`` when given (and ``out`` returned), else to a new buffer. Only upper triangles are read."""
    mats = list(mats)
    check_many(mats, scales)
    total = sum(packed_size(m.shape[0]) for m in mats)
    if out is not None:
        check_buffer(out, mats[0], offset, total, "out")
    lib = _ext_for("pack_symmetric_many", mats[0], sum(m.shape[0] ** 2 for m in mats))
    if lib is None:
        return reference.pack_symmetric_many_torch(mats, scales, out=out, offset=offset)
    if out is None:
        out, offset = torch.empty(total, dtype=mats[0].dtype, device=mats[0].device), 0
    lib.pack_symmetric_many_(out, int(offset), mats, [float(s) for s in scales] if scales is not None else [])
    return out


def unpack_symmetric_many(flat: Tensor, dims: Sequence[int], *, offset: int = 0) -> list[Tensor]:
    """Inverse of :func:`pack_symmetric_many` (scales 1): the symmetric ``d x d`` matrices, ``d`` in ``dims``,
    whose packed upper triangles lie one after another in ``flat`` from ``offset`` on (new tensors)."""
    check_float(flat, "flat")
    check_ndim(flat, 1, "flat")
    dims = check_dims(dims)
    total = sum(packed_size(d) for d in dims)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + total > flat.numel():
        raise ValueError(f"flat too small: dims {dims} need {total} elements at offset {offset}, "
                         f"but it has {flat.numel()}")
    lib = _ext_for("unpack_symmetric_many", flat, sum(d * d for d in dims))
    if lib is None:
        return reference.unpack_symmetric_many_torch(flat, dims, offset=offset)
    return list(lib.unpack_symmetric_many(flat, int(offset), dims))


def eigen_scale(v: Tensor, d_g: Tensor, d_a: Tensor, damping: float, *, acc: Tensor | None = None) -> Tensor:
    """``v / (outer(d_g, d_a) + damping)`` (a new tensor) for ``v`` of shape ``(m, n)``, ``d_g`` ``(m,)``, ``d_a``
    ``(n,)``: the eigenbasis step of K-FAC, ``QG^T V QA`` scaled by the damped eigenvalues of ``G (x) A``. With
    ``acc`` (``(m, n)``), also ``acc += v**2`` in place, in the same pass (EK-FAC's second moments)."""
    check_float(v, "v")
    check_ndim(v, 2, "v")
    check_like(d_g, v, "d_g", "v")
    check_like(d_a, v, "d_a", "v")
    if d_g.dim() != 1 or d_g.shape[0] != v.shape[0]:
        raise ValueError(f"d_g must have shape ({v.shape[0]},) to match v {tuple(v.shape)}, got {tuple(d_g.shape)}")
    if d_a.dim() != 1 or d_a.shape[0] != v.shape[1]:
        raise ValueError(f"d_a must have shape ({v.shape[1]},) to match v {tuple(v.shape)}, got {tuple(d_a.shape)}")
    if acc is not None:
        check_like(acc, v, "acc", "v")
        if acc.shape != v.shape:
            raise ValueError(f"acc must have the shape of v {tuple(v.shape)}, got {tuple(acc.shape)}")
    lib = _ext_for("eigen_scale", v, v.numel())
    if lib is None:
        return reference.eigen_scale_torch(v, d_g, d_a, damping, acc=acc)
    if acc is None:
        return lib.eigen_scale(v, d_g, d_a, float(damping))
    return lib.eigen_scale_acc_(v, d_g, d_a, float(damping), acc)
