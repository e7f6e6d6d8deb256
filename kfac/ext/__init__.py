"""Fused factor-update kernels: an optional C++/CUDA extension with pure-PyTorch implementations of the same ops.

Each public op below dispatches to the compiled extension (``torch.ops.kfac_ext``, sources in ``csrc/``) when it is
loaded and is the faster implementation for the device and size (see :data:`PREFERRED`, measured by
``benchmarks/fused_ops.py``), and otherwise runs its ``*_torch`` counterpart in this module, which defines the
semantics. Callers never need to know which one ran; inputs are validated identically (``ValueError``, or
``TypeError`` for a non-tensor).

Conventions: ``x`` holds the ``(N, d)`` rows of a layer's inputs or output gradients; a symmetric ``d x d`` matrix
travels *packed* as its upper triangle, diagonal included, row-major (the order of ``torch.triu_indices(d, d)``),
``d (d + 1) / 2`` numbers. The extension handles float32 and float64 on CPU and CUDA; other floating dtypes or
devices always take the PyTorch path.

Loading never compiles implicitly: importing ``kfac`` or this module does nothing. The first op call loads a
library that ``python -m kfac.ext build`` (or an earlier :func:`load`) left in the cache if it matches the current
sources; compiling happens only in :func:`load` / :func:`enable`, ``python -m kfac.ext build``, or on first use
when ``KFAC_BUILD_EXT=1``. ``KFAC_DISABLE_EXT=1`` forces the PyTorch path. A failed build logs one line on the
``"kfac"`` logger and the PyTorch path is used.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from . import _build

__all__ = [  # noqa: RUF022 - grouped: control, fused ops, their PyTorch implementations
    "PREFERRED", "available", "backend", "enable", "info", "load", "packed_size", "set_preferred", "uses_extension",
    "sym_outer_update", "sym_outer_pack", "pack_symmetric_many", "unpack_symmetric_many", "eigen_scale",
    "sym_outer_update_torch", "sym_outer_pack_torch", "pack_symmetric_many_torch", "unpack_symmetric_many_torch",
    "eigen_scale_torch",
]

logger = logging.getLogger("kfac")

OPS = ("sym_outer_update", "sym_outer_pack", "pack_symmetric_many", "unpack_symmetric_many", "eigen_scale")

PREFERRED: dict[str, dict[str, int]] = {
    # Measured on CPU (benchmarks/fused_ops.py, results/fused_ops.json): the extension wins from these sizes on;
    # below them the call overhead outweighs the gain.
    "cpu": {"sym_outer_update": 2 ** 21, "sym_outer_pack": 32 * 32, "pack_symmetric_many": 0,
            "unpack_symmetric_many": 0, "eigen_scale": 2 ** 15},
    # Not measured on a GPU yet: PyTorch until benchmarks/fused_ops.py shows a win there (see set_preferred).
    "cuda": {},
}
"""Per device type: op -> the smallest problem size from which the extension is used by default (when loaded);
ops not listed always run on PyTorch. Sizes: for ``sym_outer_update`` the multiply-adds that the blocked product
skips, ``N d (d - 64) / 2`` (the rest is a plain matmul either way); ``d * d`` for ``sym_outer_pack``; the
matrices' total ``sum d_k^2`` for packing and unpacking; ``m * n`` for ``eigen_scale``."""

_EXT_DTYPES = (torch.float32, torch.float64)
Backend = Literal["auto", "extension", "torch"]


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.attempted = False  # automatic load (prebuilt library, or KFAC_BUILD_EXT) tried in this process
        self.library: str | None = None
        self.error: str | None = None
        self.cuda = False
        self.backend: Backend = "auto"


_state = _State()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _disabled() -> bool:
    return _env_flag("KFAC_DISABLE_EXT")


def _summarise(exc: BaseException) -> str:
    """One line for the log: the exception's first line; for a failed compilation, the first compiler diagnostic
    (an "error" line, else the first line that is not a build command)."""
    lines = [line.strip() for line in (str(exc) or type(exc).__name__).splitlines() if line.strip()]
    head = lines[0]
    if not head.startswith("Error building extension"):
        return head[:300]
    head = head.split(": [", 1)[0]
    output = [line for line in lines[1:] if not line.startswith(("[", "FAILED:", "ninja:")) and " -c " not in line]
    detail = next((line for line in output if "error" in line.lower()), output[0] if output else None)
    return f"{head}: {detail[:240]}" if detail else head


def _registered(path: Any) -> None:
    _state.library = str(path)
    _state.error = None
    _state.cuda = "cuda=yes" in torch.ops.kfac_ext.build_info()


# ---- loading -----------------------------------------------------------------------------------------------------

def load(*, cuda: bool | None = None, verbose: bool = False, cache_dir: str | os.PathLike[str] | None = None,
         raise_errors: bool = False) -> bool:
    """Compile (if needed) and load the extension; ``True`` once it is loaded. A failed build is logged once and
    not retried in this process (unless ``raise_errors``).

    Args:
        cuda: include the CUDA kernels (default: whether CUDA is usable here).
        verbose: show the compiler commands and output.
        cache_dir: where build folders live (default ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``).
        raise_errors: raise on failure instead of logging it and keeping the PyTorch fallback.
    """
    with _state.lock:
        if _state.library is not None:
            return True
        if _state.error is not None and not raise_errors:
            return False
        if _disabled():
            if raise_errors:
                raise RuntimeError("kfac.ext: the extension is disabled by KFAC_DISABLE_EXT")
            logger.info("kfac: C++ extension disabled by KFAC_DISABLE_EXT; using the PyTorch fallback")
            return False
        _state.attempted = True
        root = None if cache_dir is None else Path(cache_dir)
        try:
            _registered(_build.build(_build.BuildConfig.default(cuda=cuda), verbose=verbose, root=root))
            return True
        except Exception as exc:  # any build/load failure means: use the fallback
            _state.error = _summarise(exc)
            if raise_errors:
                raise
            logger.warning("kfac: C++ extension unavailable, using the PyTorch fallback: %s "
                           "(details: python -m kfac.ext build --verbose)", _state.error)
            return False


def enable(**kwargs: Any) -> bool:
    """Opt in to the extension: :func:`load` (same arguments); ``True`` once it is loaded."""
    return load(**kwargs)


def _ops() -> Any | None:
    """``torch.ops.kfac_ext`` when the extension is loaded (loading a current prebuilt library, or building when
    ``KFAC_BUILD_EXT=1``, on the first call), else ``None``. Honours ``KFAC_DISABLE_EXT`` on every call."""
    if _disabled():
        return None
    if _state.library is None and not _state.attempted:
        with _state.lock:
            if not _state.attempted:
                if _env_flag("KFAC_BUILD_EXT"):
                    load()
                else:
                    _state.attempted = True
                    try:
                        path = _build.load_prebuilt(_build.BuildConfig.default())
                        if path is not None:
                            _registered(path)
                    except Exception as exc:  # noqa: BLE001 - a broken cache entry must not break training
                        _state.error = _summarise(exc)
                        logger.warning("kfac: could not load the prebuilt C++ extension, using the PyTorch "
                                       "fallback: %s", _state.error)
    return torch.ops.kfac_ext if _state.library is not None else None


def available() -> bool:
    """Whether the compiled extension is loaded (or, without compiling, loadable) and not disabled."""
    return _ops() is not None


def info() -> dict[str, Any]:
    """Status of the extension: loaded library, last error, sources, build folder, preferences."""
    config = _build.BuildConfig.default()
    return {
        "available": available(), "disabled": _disabled(), "library": _state.library, "error": _state.error,
        "cuda_kernels": _state.cuda, "backend": _state.backend, "sources": str(_build.source_dir()),
        "build_dir": str(_build.build_dir(config)), "torch": torch.__version__,
        "preferred": {k: dict(sorted(v.items())) for k, v in PREFERRED.items()},
        "build_info": torch.ops.kfac_ext.build_info() if _state.library is not None else None,
    }


@contextlib.contextmanager
def backend(name: Backend) -> Iterator[None]:
    """Process-wide choice of implementation inside the block: ``"auto"`` (default: :data:`PREFERRED`),
    ``"extension"`` (the extension for every op it supports; raises if it is not available) or ``"torch"``."""
    if name not in ("auto", "extension", "torch"):
        raise ValueError(f"backend must be 'auto', 'extension' or 'torch', got {name!r}")
    if name == "extension" and _ops() is None:
        raise RuntimeError(f"kfac.ext: the extension is not available ({_state.error or 'not built or disabled'})")
    previous, _state.backend = _state.backend, name
    try:
        yield
    finally:
        _state.backend = previous


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
    mode = _state.backend
    if mode == "torch" or t.dtype not in _EXT_DTYPES or t.device.type not in ("cpu", "cuda"):
        return None
    lib = _ops()
    if lib is None or (t.device.type == "cuda" and not _state.cuda):
        return None
    if mode == "auto":
        threshold = PREFERRED.get(t.device.type, {}).get(op)
        if threshold is None or size < threshold:
            return None
    return lib


# ---- validation (shared by both implementations) -------------------------------------------------------------------

def _check_float(t: Any, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")


def _check_like(t: Any, ref: Tensor, name: str, ref_name: str) -> None:
    _check_float(t, name)
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_ndim(t: Tensor, ndim: int, name: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_square(t: Tensor, d: int, name: str) -> None:
    if t.dim() != 2 or t.shape[0] != t.shape[1] or (d >= 0 and t.shape[0] != d):
        want = f"{d} x {d}" if d >= 0 else "square"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def _check_buffer(buffer: Any, ref: Tensor, offset: int, needed: int, name: str = "buffer") -> None:
    _check_like(buffer, ref, name, "the input")
    _check_ndim(buffer, 1, name)
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + needed > buffer.numel():
        raise ValueError(f"{name} too small: {needed} elements needed at offset {offset}, "
                         f"but it has {buffer.numel()}")


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


# ---- sym_outer_update -----------------------------------------------------------------------------------------------

def sym_outer_update(x: Tensor, out: Tensor | None = None, *, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """``S = beta * out + alpha * x^T x`` for rows ``x`` of shape ``(N, d)``; ``out`` (symmetric ``d x d``) is
    updated in place and returned. Without ``out``, returns a new ``alpha * x^T x`` (``beta`` unused).

    The extension multiplies only the blocks on and above the diagonal, reads only the upper triangle of ``out``
    (as BLAS ``syrk`` does) and mirrors the result, so it is exactly symmetric; the PyTorch path computes the full
    product (symmetric up to rounding). ``beta == 0`` ignores ``out``'s contents (NaN included).
    """
    _check_float(x, "x")
    _check_ndim(x, 2, "x")
    if out is not None:
        _check_like(out, x, "out", "x")
        _check_square(out, x.shape[1], "out")
    lib = _ext_for("sym_outer_update", x, x.shape[0] * x.shape[1] * max(x.shape[1] - 64, 0) // 2)
    if lib is None:
        return sym_outer_update_torch(x, out, alpha=alpha, beta=beta)
    if out is None:
        return lib.sym_outer(x, float(alpha), 0)
    lib.sym_outer_update_(out, x, float(alpha), float(beta), 0)
    return out


def sym_outer_update_torch(x: Tensor, out: Tensor | None = None, *, alpha: float = 1.0,
                           beta: float = 1.0) -> Tensor:
    """PyTorch implementation of :func:`sym_outer_update` (one full ``x^T x`` product)."""
    if out is None:
        s = torch.mm(x.T, x)
        return s if alpha == 1 else s.mul_(alpha)
    return out.addmm_(x.T, x, beta=beta, alpha=alpha)


# ---- sym_outer_pack -------------------------------------------------------------------------------------------------

def sym_outer_pack(x: Tensor, buffer: Tensor, offset: int = 0, *, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """``buffer[offset : offset + d(d+1)/2] = beta * (same) + alpha * pack(x^T x)``, ``pack`` being the row-major
    upper triangle; returns that slice. One pass replaces "matmul, symmetrise, pack, concatenate": the packed form
    is symmetric by construction. ``beta == 0`` overwrites (the old contents are never read)."""
    _check_float(x, "x")
    _check_ndim(x, 2, "x")
    n = packed_size(x.shape[1])
    _check_buffer(buffer, x, offset, n)
    lib = _ext_for("sym_outer_pack", x, x.shape[1] ** 2)
    if lib is None:
        return sym_outer_pack_torch(x, buffer, offset, alpha=alpha, beta=beta)
    lib.sym_outer_pack_(buffer, int(offset), x, float(alpha), float(beta), 0)
    return buffer[offset:offset + n]


def sym_outer_pack_torch(x: Tensor, buffer: Tensor, offset: int = 0, *, alpha: float = 1.0,
                         beta: float = 0.0) -> Tensor:
    """PyTorch implementation of :func:`sym_outer_pack` (matmul, then a gather of the upper triangle)."""
    packed = _triu_pack(torch.mm(x.T, x))
    if alpha != 1:
        packed.mul_(alpha)
    view = buffer[offset:offset + packed.numel()]
    return view.copy_(packed) if beta == 0 else view.mul_(beta).add_(packed)


# ---- pack_symmetric_many / unpack_symmetric_many --------------------------------------------------------------------

def _check_many(mats: Sequence[Tensor], scales: Sequence[float] | None) -> None:
    if len(mats) == 0:
        raise ValueError("pack_symmetric_many needs at least one matrix")
    _check_float(mats[0], "matrix 0")
    for k, m in enumerate(mats):
        _check_like(m, mats[0], f"matrix {k}", "matrix 0")
        _check_square(m, -1, f"matrix {k}")
    if scales is not None and len(scales) != len(mats):
        raise ValueError(f"got {len(scales)} scales for {len(mats)} matrices")


def pack_symmetric_many(mats: Sequence[Tensor], scales: Sequence[float] | None = None, *,
                        out: Tensor | None = None, offset: int = 0) -> Tensor:
    """One flat buffer of the packed upper triangles of ``mats`` (each symmetric ``d_k x d_k``), in order, each
    multiplied by ``scales[k]`` (default 1): ``[s_0 pack(M_0), s_1 pack(M_1), ...]``. Written to
    ``out[offset:]`` when given (and ``out`` returned), else to a new buffer. Only upper triangles are read."""
    mats = list(mats)
    _check_many(mats, scales)
    total = sum(packed_size(m.shape[0]) for m in mats)
    if out is not None:
        _check_buffer(out, mats[0], offset, total, "out")
    lib = _ext_for("pack_symmetric_many", mats[0], sum(m.shape[0] ** 2 for m in mats))
    if lib is None:
        return pack_symmetric_many_torch(mats, scales, out=out, offset=offset)
    if out is None:
        out, offset = torch.empty(total, dtype=mats[0].dtype, device=mats[0].device), 0
    lib.pack_symmetric_many_(out, int(offset), mats, [float(s) for s in scales] if scales is not None else [])
    return out


def pack_symmetric_many_torch(mats: Sequence[Tensor], scales: Sequence[float] | None = None, *,
                              out: Tensor | None = None, offset: int = 0) -> Tensor:
    """PyTorch implementation of :func:`pack_symmetric_many` (a gather per matrix, then one concatenation)."""
    parts = [_triu_pack(m) for m in mats]
    if scales is not None:
        parts = [p if s == 1 else p.mul_(s) for p, s in zip(parts, scales)]
    flat = torch.cat(parts)
    if out is None:
        return flat
    out[offset:offset + flat.numel()].copy_(flat)
    return out


def _check_dims(dims: Sequence[int]) -> list[int]:
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


def unpack_symmetric_many(flat: Tensor, dims: Sequence[int], *, offset: int = 0) -> list[Tensor]:
    """Inverse of :func:`pack_symmetric_many` (scales 1): the symmetric ``d x d`` matrices, ``d`` in ``dims``,
    whose packed upper triangles lie one after another in ``flat`` from ``offset`` on (new tensors)."""
    _check_float(flat, "flat")
    _check_ndim(flat, 1, "flat")
    dims = _check_dims(dims)
    total = sum(packed_size(d) for d in dims)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + total > flat.numel():
        raise ValueError(f"flat too small: dims {dims} need {total} elements at offset {offset}, "
                         f"but it has {flat.numel()}")
    lib = _ext_for("unpack_symmetric_many", flat, sum(d * d for d in dims))
    if lib is None:
        return unpack_symmetric_many_torch(flat, dims, offset=offset)
    return list(lib.unpack_symmetric_many(flat, int(offset), dims))


def unpack_symmetric_many_torch(flat: Tensor, dims: Sequence[int], *, offset: int = 0) -> list[Tensor]:
    """PyTorch implementation of :func:`unpack_symmetric_many` (a scatter per matrix)."""
    out = []
    for d in dims:
        n = packed_size(d)
        out.append(_triu_unpack(flat[offset:offset + n], d))
        offset += n
    return out


# ---- eigen_scale ----------------------------------------------------------------------------------------------------

def eigen_scale(v: Tensor, d_g: Tensor, d_a: Tensor, damping: float, *, acc: Tensor | None = None) -> Tensor:
    """``v / (outer(d_g, d_a) + damping)`` (a new tensor) for ``v`` of shape ``(m, n)``, ``d_g`` ``(m,)``, ``d_a``
    ``(n,)``: the eigenbasis step of K-FAC, ``QG^T V QA`` scaled by the damped eigenvalues of ``G (x) A``. With
    ``acc`` (``(m, n)``), also ``acc += v**2`` in place, in the same pass (EK-FAC's second moments)."""
    _check_float(v, "v")
    _check_ndim(v, 2, "v")
    _check_like(d_g, v, "d_g", "v")
    _check_like(d_a, v, "d_a", "v")
    if d_g.dim() != 1 or d_g.shape[0] != v.shape[0]:
        raise ValueError(f"d_g must have shape ({v.shape[0]},) to match v {tuple(v.shape)}, got {tuple(d_g.shape)}")
    if d_a.dim() != 1 or d_a.shape[0] != v.shape[1]:
        raise ValueError(f"d_a must have shape ({v.shape[1]},) to match v {tuple(v.shape)}, got {tuple(d_a.shape)}")
    if acc is not None:
        _check_like(acc, v, "acc", "v")
        if acc.shape != v.shape:
            raise ValueError(f"acc must have the shape of v {tuple(v.shape)}, got {tuple(acc.shape)}")
    lib = _ext_for("eigen_scale", v, v.numel())
    if lib is None:
        return eigen_scale_torch(v, d_g, d_a, damping, acc=acc)
    if acc is None:
        return lib.eigen_scale(v, d_g, d_a, float(damping))
    return lib.eigen_scale_acc_(v, d_g, d_a, float(damping), acc)


def eigen_scale_torch(v: Tensor, d_g: Tensor, d_a: Tensor, damping: float, *, acc: Tensor | None = None) -> Tensor:
    """PyTorch implementation of :func:`eigen_scale`."""
    out = v / (torch.outer(d_g, d_a) + damping)
    if acc is not None:
        acc.addcmul_(v, v)
    return out
