"""Output-space Hessians of the losses adaptive K-FAC supports: the ``H`` of the generalised Gauss-Newton
``G = J^T H J`` (``J``: Jacobian of the network outputs ``z`` w.r.t. the parameters).

Conventions equal PyTorch's losses with ``reduction="mean"`` over a batch of ``N`` examples:

* ``"cross_entropy"``: ``F.cross_entropy(z, y)``, logits ``z`` of shape ``(N, C)`` (or ``(N, ..., C)`` folded into
  rows): per row ``H = (diag(p) - p p^T) / N`` with ``p = softmax(z)``. Independent of the labels.
* ``"mse"``: ``F.mse_loss(z, y)`` (mean over all ``numel`` elements of ``(z - y)^2``): ``H = 2 I / numel``.
* ``"bernoulli"``: ``F.binary_cross_entropy_with_logits(z, y)`` (mean over elements): ``H = diag(s (1 - s)) / numel``
  with ``s = sigmoid(z)``.

For these losses the GGN is the Fisher of the model's predictive distribution, the curvature K-FAC approximates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["LOSSES", "hessian_vector_product"]


def _cross_entropy(z: Tensor, v: Tensor) -> Tensor:
    z, v = z.reshape(-1, z.shape[-1]), v.reshape(-1, v.shape[-1])
    p = torch.softmax(z.detach(), dim=-1)
    return (p * v - p * (p * v).sum(-1, keepdim=True)) / z.shape[0]


def _mse(z: Tensor, v: Tensor) -> Tensor:
    return 2.0 * v / z.numel()


def _bernoulli(z: Tensor, v: Tensor) -> Tensor:
    s = torch.sigmoid(z.detach())
    return s * (1 - s) * v / z.numel()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": _cross_entropy, "mse": _mse, "bernoulli": _bernoulli}
"""Name -> ``(outputs z, direction v in output space) -> H v`` (same shape as ``v``, or rows for cross-entropy)."""


def hessian_vector_product(loss: str, outputs: Tensor, v: Tensor) -> Tensor:
    """``H v`` for the output-space Hessian ``H`` of ``loss`` at ``outputs`` (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if v.shape != outputs.shape:
        raise ValueError(f"direction has shape {tuple(v.shape)}, outputs have {tuple(outputs.shape)}")
    return LOSSES[loss](outputs, v)
