"""Statistics a caller drives: ``G`` of the Monte-Carlo Fisher from labels sampled by the preconditioner
(:meth:`mc_backward`) or from the caller's own samples of the loss's output Hessian (:meth:`sampled_backward`),
and backward passes that must not count as statistics (:meth:`statistics_paused`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .hooks import StatisticsHooks

__all__ = ["SampledStatisticsMixin"]


class SampledStatisticsMixin:
    """Mixed into :class:`kfac.KFACPreconditioner` (which provides these attributes)."""

    fisher: str
    _hooks: "StatisticsHooks"

    def capturing(self) -> bool:  # pragma: no cover (provided by the preconditioner)
        raise NotImplementedError

    def mc_backward(self, outputs: Tensor, *, loss: str = "cross_entropy", reduction: str = "mean",
                    generator: torch.Generator | None = None) -> None:
        """Collect ``G`` for ``fisher="mc"`` from a loss on labels sampled from ``outputs`` (see
        :mod:`kfac.kronecker.sampling`).

        Call after the forward pass and before ``loss.backward()`` on every (micro-)batch; it is a no-op on steps
        that do not update factors. Parameter gradients are not touched. Like the user's loss under gradient
        accumulation, the sampled loss is divided by ``accumulation_steps``.
        """
        if self.fisher != "mc":
            raise RuntimeError("mc_backward() needs fisher='mc' (this preconditioner uses the empirical Fisher)")
        if not self.capturing():
            return
        self._hooks.mc_backward(outputs, loss=loss, reduction=reduction, generator=generator)

    def sampled_backward(self, outputs: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Collect ``G`` for ``fisher="mc"`` by back-propagating Monte-Carlo samples ``grads`` of the loss's output
        Hessian (``E[u u^T] = H``, scaled as the loss is: accumulation, AMP) from ``outputs``; a no-op on steps
        that do not update factors. Parameter gradients are not touched."""
        if self.fisher != "mc":
            raise RuntimeError("sampled_backward() needs fisher='mc' (this preconditioner uses the empirical Fisher)")
        if self.capturing():
            self._hooks.sampled_backward(outputs, grads)

    @contextlib.contextmanager
    def statistics_paused(self) -> Iterator[None]:
        """Backward passes inside the block collect no statistics (e.g. derivatives of the loss with respect to the
        model's outputs, which reach the hooks of the last layer's output)."""
        self._hooks.paused = True
        try:
            yield
        finally:
            self._hooks.paused = False
