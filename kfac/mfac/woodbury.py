"""The linear algebra and block plumbing shared by M-FAC's dynamic and static Fishers (:mod:`kfac.mfac.fisher`).

With ``k`` gradients stacked as the rows of ``G`` (``k x d``) and damping ``λ > 0``, Woodbury gives::

    F = λ I + (1/k) G^T G,      F^{-1} v = (v - G^T M^{-1} G v) / λ,      M = k λ I + G G^T   (k x k)

:class:`GramFactor` factorises ``M`` in float64 (Cholesky ``M = L L^T``; eigendecomposition with the spectrum
clamped to ``>= kλ`` if that fails) and applies ``M^{-1}`` or ``R`` with ``R^T R = M^{-1}``.
:class:`BlockLayout` validates ``{name: tensor}`` or flat inputs against named blocks; :class:`BlockFisher` is the
base of both Fishers: the layout, the groups (one over all blocks in global mode, one per block otherwise) and the
sum over ranks of ``(groups, ...)`` partials.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, overload

import torch
from torch import Tensor

__all__ = ["FLAT_BLOCK", "AllReduce", "BlockFisher", "BlockLayout", "BlockMode", "GramFactor", "Vectors",
           "check_damping", "check_mode"]

AllReduce = Callable[[Tensor], Tensor | None]
BlockMode = Literal["global", "per_block"]
Vectors = Mapping[str, Tensor] | Tensor

FLAT_BLOCK = "params"
"""Name of the single block when a plain size or a plain gradient matrix is given instead of named blocks."""


def check_damping(damping: float) -> float:
    """``damping`` as a float if it is finite and ``> 0``; ``ValueError`` otherwise."""
    value = float(damping)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    return value


def check_mode(blocks: str) -> BlockMode:
    """``blocks`` if it is ``"global"`` or ``"per_block"``; ``ValueError`` otherwise."""
    if blocks not in ("global", "per_block"):
        raise ValueError(f"blocks must be 'global' or 'per_block', got {blocks!r}")
    return blocks  # type: ignore[return-value]


class BlockLayout:
    """Ordered named blocks of ``d_b = prod(shape)`` elements: validates ``{name: tensor}`` or flat inputs and
    restores the input's form on output."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        self.sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        for name, size in self.sizes.items():
            if size < 1 or any(s < 0 for s in self.shapes[name]):
                raise ValueError(f"block {name!r} has shape {self.shapes[name]}; blocks need at least one element")
        self.total = sum(self.sizes.values())

    def flatten(self, values: Vectors, what: str, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """``{name: 1-D tensor of size d_b}`` in block order, cast to ``dtype`` on ``device``."""
        if isinstance(values, Tensor):
            if values.numel() != self.total:
                raise ValueError(
                    f"{what}: flat tensor has {values.numel()} elements, expected {self.total} (sum of block sizes)"
                )
            parts = values.reshape(-1).split(list(self.sizes.values())) if self.sizes else ()
            values = dict(zip(self.sizes, parts))
        elif not isinstance(values, Mapping):
            raise TypeError(f"{what} must be a mapping of block name -> tensor or a flat tensor, got {type(values)}")
        unknown = [name for name in values if name not in self.sizes]
        if unknown:
            raise ValueError(f"{what}: unknown block(s) {unknown}; this instance holds {list(self.sizes)}")
        missing = [name for name in self.sizes if name not in values]
        if missing:
            raise ValueError(f"{what}: missing block(s) {missing}")
        out = {}
        for name, size in self.sizes.items():
            t = values[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}[{name!r}] must be a tensor, got {type(t)}")
            if t.numel() != size:
                raise ValueError(f"{what}[{name!r}] has shape {tuple(t.shape)}, expected {size} elements")
            out[name] = t.reshape(-1).to(device=device, dtype=dtype)
        return out

    def restore(self, like: Vectors, flat: dict[str, Tensor]) -> Vectors:
        """Give per-block results the container and shapes of the input ``like``."""
        if isinstance(like, Tensor):
            if not flat:
                return like.new_zeros(like.shape)
            return torch.cat([flat[name] for name in self.sizes]).reshape(like.shape)
        return {name: flat[name].reshape(like[name].shape) for name in self.sizes}


class GramFactor:
    """Factorisation of ``M = kλ I + K`` (``k x k``, float64, ``K = G G^T`` PSD): Cholesky ``M = L L^T``, or the
    eigendecomposition ``M = Q diag(s) Q^T`` with ``s`` clamped to ``>= kλ`` when the Cholesky fails."""

    def __init__(self, gram: Tensor, damping: float) -> None:
        k = gram.shape[-1]
        self.damping = damping
        floor = k * damping
        mat = gram.to(torch.float64) + floor * torch.eye(k, dtype=torch.float64, device=gram.device)
        chol, info = torch.linalg.cholesky_ex(mat)
        self.chol: Tensor | None = None
        self.eig: tuple[Tensor, Tensor] | None = None
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            self.chol = chol
        else:  # K is PSD, so the true spectrum of M is >= kλ: clamping only removes round-off
            evals, evecs = torch.linalg.eigh((mat + mat.mT) / 2)
            self.eig = (evecs, evals.clamp_min(floor))

    def solve(self, u: Tensor) -> Tensor:
        """``M^{-1} u`` for ``u`` of shape (k,): two triangular solves, O(k^2)."""
        if self.chol is not None:
            return torch.cholesky_solve(u.unsqueeze(-1), self.chol).squeeze(-1)
        evecs, evals = self.eig  # type: ignore[misc]
        return evecs @ ((evecs.mT @ u) / evals)

    def whiten(self, x: Tensor) -> Tensor:
        """``R x`` for ``x`` of shape (k, n), with ``R^T R = M^{-1}`` (``R = L^{-1}`` or ``diag(s)^{-1/2} Q^T``):
        O(k^2 n)."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol, x, upper=False)
        evecs, evals = self.eig  # type: ignore[misc]
        return (evecs.mT @ x) / evals.sqrt().unsqueeze(-1)


class BlockFisher:
    """Base of the M-FAC Fishers: block layout, groups (one in global mode, one per block otherwise), the sum over
    ranks of per-group partials, and the wrappers built on the two-phase IHVP
    (``partial_projection`` -> sum over ranks -> ``finish_ihvp``)."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        blocks: str,
        all_reduce: AllReduce | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        self.mode: BlockMode = check_mode(blocks)
        self.dtype = dtype
        self.device = device
        self._all_reduce = all_reduce
        self._layout = BlockLayout(shapes)
        names = tuple(self._layout.sizes)
        self._groups: list[tuple[str, ...]] = [names] if self.mode == "global" else [(n,) for n in names]

    @property
    def block_names(self) -> tuple[str, ...]:
        """Names of the blocks this instance (rank) holds, in order."""
        return tuple(self._layout.sizes)

    @property
    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._layout.shapes)

    def _inputs(self, values: Vectors, what: str) -> dict[str, Tensor]:
        return self._layout.flatten(values, what, self.dtype, self.device)

    def _reduce(self, partial: Tensor) -> Tensor:
        """Sum ``partial`` (groups, ...) over ranks in global mode (the hook sees ``partial[0]``); no-op otherwise."""
        if self.mode != "global" or self._all_reduce is None or partial.numel() == 0:
            return partial
        part = partial[0]
        out = self._all_reduce(part)
        out = part if out is None else out
        if not isinstance(out, Tensor) or out.shape != part.shape:
            raise ValueError(f"all_reduce hook must return a tensor of shape {tuple(part.shape)} (or None if in place)")
        return out.reshape(partial.shape)

    def partial_projection(self, vectors: Vectors) -> Tensor:
        """This rank's share of the ``(groups, k)`` float64 projection of ``v`` (summed over ranks in global mode)."""
        raise NotImplementedError

    def finish_ihvp(self, vectors: Vectors, projection: Tensor, *, damping: float | None = None) -> Vectors:
        """``F^{-1} v`` given the projection of ``v`` summed over ranks."""
        raise NotImplementedError

    @overload
    def ihvp(self, vectors: Tensor, *, damping: float | None = None) -> Tensor: ...

    @overload
    def ihvp(self, vectors: Mapping[str, Tensor], *, damping: float | None = None) -> dict[str, Tensor]: ...

    def ihvp(self, vectors: Vectors, *, damping: float | None = None) -> Vectors:
        """``F^{-1} v`` per held block (``{name: tensor}`` in the input's shapes, or a flat tensor for a flat input).

        O(d m + m^2) per call (plus a one-off O(m^3) refactor after an ``add`` or a damping change in the dynamic
        form). Global mode: one reduction of ``k = count`` float64 elements (``G v`` summed over blocks).
        """
        return self.finish_ihvp(vectors, self._reduce(self.partial_projection(vectors)), damping=damping)

    def ihvp_flat(self, vector: Tensor, *, damping: float | None = None) -> Tensor:
        """:meth:`ihvp` of the concatenation of the held blocks (block order); returns a 1-D tensor."""
        return self.ihvp(vector.reshape(-1), damping=damping)

    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]:
        """``diag(F^{-1})`` per held block, in the block's declared shape."""
        raise NotImplementedError

    def diag_flat(self, *, damping: float | None = None) -> Tensor:
        """:meth:`diag` concatenated over the held blocks (block order)."""
        parts = [t.reshape(-1) for t in self.diag(damping=damping).values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)
