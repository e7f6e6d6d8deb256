"""The interface every curvature method implements over a :class:`~kfac.kronecker.store.FactorEntry`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..store import FactorEntry

__all__ = ["CurvatureMethod", "DecompositionError", "KroneckerMethod", "require_factors", "with_float64_retry"]


class DecompositionError(RuntimeError):
    """A factor could not be decomposed even in float64 (non-finite or numerically broken factors)."""


@runtime_checkable
class CurvatureMethod(Protocol):
    """Turns running factors into decompositions and applies the damped inverse to gradient matrices."""

    name: str
    decomposition: str     # what the planner's cost model prices: "eigen" or "inverse"
    corrects: bool         # re-estimates eigenvalues from per-example gradients (EK-FAC)
    bakes_damping: bool    # the damping is fixed into the decompositions at refresh time (inverse)
    relative_damping: bool  # the damping is in units of each layer's mean eigenvalue

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        """Recompute ``entry``'s decompositions from its factors; raise :class:`DecompositionError` on failure."""

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:
        """Recompute the decomposition of one factor (``"A"`` or ``"G"``); used when ranks own factors apart."""

    def fields(self, entry: FactorEntry, factor: str) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
        """``(field name, shape, symmetric)`` of the decomposition tensors of ``factor`` (what a refresh sends;
        symmetric matrices travel as packed upper triangles)."""

    def ready(self, entry: FactorEntry) -> bool:
        """Whether ``entry`` holds the decompositions :meth:`precondition` needs."""

    def precondition(self, entry: FactorEntry, grad: Tensor, *, damping: float) -> Tensor:
        """Apply the damped inverse curvature of this layer to a ``(g_dim, a_dim)`` gradient matrix."""

    def diag(self, entry: FactorEntry, *, damping: float) -> Tensor:
        """The diagonal of the damped inverse curvature, as a ``(g_dim, a_dim)`` matrix."""

    def reset_corrections(self, entry: FactorEntry) -> None:
        """Restart the eigenvalue corrections after a refresh changed the eigenbases."""

    def correction_sum(self, entry: FactorEntry, a: Tensor, g: Tensor) -> Tensor | None:
        """``sum_n (QG^T V_n QA)^2`` of per-example rows (``None`` where no corrections are kept)."""

    def update_corrections(self, entry: FactorEntry, batch: Tensor, decay: float) -> None:
        """Blend a batch estimate into the corrections."""


def with_float64_retry(fn, matrix: Tensor, what: str):
    """Run ``fn(matrix)``; on failure or non-finite output retry in float64, then raise DecompositionError."""
    if not torch.isfinite(matrix).all():
        raise DecompositionError(f"{what} has non-finite entries")
    last: Exception | None = None
    for dtype in dict.fromkeys((matrix.dtype, torch.float64)):
        try:
            out = fn(matrix.to(dtype))
        except (RuntimeError, torch.linalg.LinAlgError) as exc:  # LinAlgError subclasses RuntimeError
            last = exc
            continue
        tensors = out if isinstance(out, tuple) else (out,)
        if all(torch.isfinite(t).all() for t in tensors):
            return tuple(t.to(matrix.dtype) for t in tensors) if isinstance(out, tuple) else out.to(matrix.dtype)
        last = RuntimeError("non-finite result")
    raise DecompositionError(f"could not decompose {what} in {matrix.dtype} or float64: {last}")


class KroneckerMethod:
    """What the Kronecker methods share: a full refresh is one refresh per factor; no eigenvalue corrections."""

    corrects = False       # EK-FAC re-estimates eigenvalues from per-example gradients
    bakes_damping = False  # the damping is fixed into the decompositions at refresh time
    relative_damping = False  # the damping is in units of each layer's mean curvature eigenvalue

    def damped(self, eigenvalues: Tensor, damping: float) -> Tensor:
        """``eigenvalues + damping`` (absolute), or ``eigenvalues + damping * mean(eigenvalues)`` (relative: the
        same damping means the same for every layer, batch size and loss normalisation)."""
        return eigenvalues + (damping * eigenvalues.mean() if self.relative_damping else damping)

    def reset_corrections(self, entry: FactorEntry) -> None:
        """Restart eigenvalue corrections (nothing to do without corrections)."""

    def correction_sum(self, entry: FactorEntry, a: Tensor, g: Tensor) -> Tensor | None:
        """Per-example projections for eigenvalue corrections (``None``: this method keeps no corrections)."""
        return None

    def update_corrections(self, entry: FactorEntry, batch: Tensor, decay: float) -> None:
        """Blend a batch estimate into the corrections (nothing to do without corrections)."""

    def refresh_factor(self, entry: FactorEntry, factor: str, *, damping: float) -> None:  # pragma: no cover
        raise NotImplementedError

    def refresh(self, entry: FactorEntry, *, damping: float) -> None:
        require_factors(entry)
        for factor in ("A", "G"):
            self.refresh_factor(entry, factor, damping=damping)


def require_factors(entry: FactorEntry) -> None:
    if entry.A is None or entry.G is None:
        raise DecompositionError(f"layer {entry.name!r} has no factors yet")
