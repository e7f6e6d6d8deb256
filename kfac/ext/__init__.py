"""Fused factor-update kernels: an optional C++/CUDA extension with pure-PyTorch implementations of the same ops.

Each public op dispatches to the compiled extension (``torch.ops.kfac_ext``, sources in ``csrc/``) when it is
loaded and is the faster implementation for the device and size (see :data:`PREFERRED`, measured by
``benchmarks/cpu/fused_ops.py``), and otherwise runs its ``*_torch`` counterpart, which defines the semantics. Callers
never need to know which one ran; inputs are validated identically (``ValueError``, or ``TypeError`` for a
non-tensor).

Conventions: ``x`` holds the ``(N, d)`` rows of a layer's inputs or output gradients; a symmetric ``d x d`` matrix
travels *packed* as its upper triangle, diagonal included, row-major (the order of ``torch.triu_indices(d, d)``),
``d (d + 1) / 2`` numbers. The extension handles float32 and float64 on CPU and CUDA; other floating dtypes or
devices always take the PyTorch path.

Loading never compiles implicitly: importing ``kfac`` or this module does nothing. The first op call loads a
library that ``python -m kfac.ext build`` (or an earlier :func:`load`) left in the cache if it matches the current
sources; compiling happens only in :func:`load` / :func:`enable`, ``python -m kfac.ext build``, or on first use
when ``KFAC_BUILD_EXT=1``. ``KFAC_DISABLE_EXT=1`` forces the PyTorch path. A failed build logs one line on the
``"kfac"`` logger and the PyTorch path is used.

Layout: :mod:`kfac.ext._loader` builds and loads the library, :mod:`kfac.ext.ops` holds the public ops and the
dispatch, :mod:`kfac.ext.reference` the PyTorch implementations and input validators.
"""

from __future__ import annotations

from ._loader import enable, load
from .ops import (  # noqa: F401 - OPS, Backend: public, outside __all__ (as before)
    OPS,
    PREFERRED,
    Backend,
    available,
    backend,
    eigen_scale,
    info,
    pack_symmetric_many,
    set_preferred,
    sym_outer_pack,
    sym_outer_update,
    unpack_symmetric_many,
    uses_extension,
)
from .reference import (
    eigen_scale_torch,
    pack_symmetric_many_torch,
    packed_size,
    sym_outer_pack_torch,
    sym_outer_update_torch,
    unpack_symmetric_many_torch,
)

__all__ = [  # noqa: RUF022 - grouped: control, fused ops, their PyTorch implementations
    "PREFERRED", "available", "backend", "enable", "info", "load", "packed_size", "set_preferred", "uses_extension",
    "sym_outer_update", "sym_outer_pack", "pack_symmetric_many", "unpack_symmetric_many", "eigen_scale",
    "sym_outer_update_torch", "sym_outer_pack_torch", "pack_symmetric_many_torch", "unpack_symmetric_many_torch",
    "eigen_scale_torch",
]
