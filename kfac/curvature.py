"""The one interface over the curvature state: what optimizers and influence queries call.

Every preconditioner (:class:`kfac.KFACPreconditioner` for K-FAC and EK-FAC, :class:`kfac.MFACPreconditioner` for
M-FAC) exposes its curvature ``C`` over named *blocks* (tracked modules, keyed by module name as in the
:class:`kfac.FactorStore`) through the same methods:

* ``update()``: absorb the statistics collected since the last call (hooks, or the gradients now in ``.grad``);
* ``refresh(damping=...)``: recompute decompositions from the absorbed statistics;
* ``ihvp(grads, damping=...)``: the damped inverse-curvature-vector product ``(C + damping I)^-1 g`` of a dict
  ``{block name: gradient}`` (each in the block's matrix layout, see :meth:`block_shapes`) or of one flat vector
  (the blocks' row-major flattenings concatenated in :attr:`layers` order); returns the same form;
* ``diag(damping=...)``: the diagonal of that inverse per block, where it is cheap;
* ``step(lr=..., grads_finite=...)``: the optimizer step (update, refresh on schedule, precondition ``.grad``);
* ``state_dict()`` (local: never communicates; a shard under a sharded distributed plan),
  ``consolidated_state_dict()`` (collective: the complete state on every rank) / ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Blocks", "Preconditioner", "as_named_blocks", "flatten_blocks", "unflatten_blocks"]

Blocks = Mapping[str, Tensor] | Tensor


@runtime_checkable
class Preconditioner(Protocol):
    """The interface shared by the K-FAC, EK-FAC and M-FAC preconditioners (see the module docstring)."""

    steps: int
    skipped_steps: int

    @property
    def layers(self) -> list[str]: ...

    def block_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def parameters_of(self) -> Mapping[str, Sequence[Tensor]]: ...

    def untrack(self, names: Iterable[str], reason: str) -> list[str]: ...

    def update(self) -> None: ...

    def refresh(self, *, damping: float | None = None) -> None: ...

    def ihvp(self, grads: Blocks, *, damping: float | None = None) -> Blocks: ...

    def diag(self, *, damping: float | None = None) -> dict[str, Tensor]: ...

    def step(self, *, lr: float | Mapping[str, float] | None = None, grads_finite: bool = True) -> bool: ...

    def discard_stale_statistics(self) -> None: ...

    def remove(self) -> None:
        """Remove every hook the preconditioner registered on the model."""

    def state_dict(self) -> dict[str, Any]: ...

    def consolidated_state_dict(self) -> dict[str, Any]: ...

    def validate_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def flatten_blocks(grads: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> Tensor:
    """Concatenate the row-major flattenings of ``grads`` in the order of ``shapes`` (every block required)."""
    if not shapes:
        raise ValueError("no blocks to flatten")
    missing = [n for n in shapes if n not in grads]
    unknown = [n for n in grads if n not in shapes]
    if missing or unknown:
        raise ValueError(f"gradients must cover exactly the tracked blocks: missing {missing}, unknown {unknown}")
    parts = []
    for n, shape in shapes.items():
        g = grads[n]
        if tuple(g.shape) != tuple(shape):
            raise ValueError(f"gradient of {n!r} has shape {tuple(g.shape)}, expected {tuple(shape)}")
        parts.append(g.reshape(-1))
    return torch.cat(parts)


def unflatten_blocks(vector: Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_blocks`."""
    total = sum(_numel(s) for s in shapes.values())
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"flat vector must have shape ({total},), got {tuple(vector.shape)}")
    out, offset = {}, 0
    for n, shape in shapes.items():
        k = _numel(shape)
        out[n] = vector[offset:offset + k].reshape(shape)
        offset += k
    return out


def as_named_blocks(grads: Blocks, shapes: Mapping[str, tuple[int, ...]], *, what: str = "ihvp",
                    kind: str = "blocks") -> tuple[dict[str, Tensor], bool]:
    """The argument of ``ihvp``-like queries as ``({block: tensor}, flat)``: a flat vector (``flat=True``) is split by
    :func:`unflatten_blocks` (it must have ``Σ_b prod(shape_b)`` entries); a mapping may name any subset of
    ``shapes``, each value a tensor of exactly its block's shape. ``ValueError`` (prefixed ``what``, naming the
    blocks ``kind``) otherwise. Give the result back in the input's form with
    ``flatten_blocks(out, shapes) if flat else out``."""
    flat = isinstance(grads, Tensor)
    named = unflatten_blocks(grads, shapes) if isinstance(grads, Tensor) else dict(grads)
    unknown = [n for n in named if n not in shapes]
    if unknown:
        raise ValueError(f"{what}: unknown {kind} {unknown}; tracked {kind} are {list(shapes)}")
    for name, g in named.items():
        if not isinstance(g, Tensor) or tuple(g.shape) != tuple(shapes[name]):
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{what}: gradient of {name!r} has shape {got}, expected {tuple(shapes[name])}")
    return named, flat


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
