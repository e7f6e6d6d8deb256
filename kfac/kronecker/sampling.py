"""Monte-Carlo Fisher: a loss on labels sampled from the model's own predictive distribution.

K-FAC's ``G`` from ``fisher="mc"`` uses output gradients of this sampled loss, so ``E[g g^T]`` equals the
per-example output Hessian of the loss (the GGN/Fisher), with the same batch reduction as the user's loss:

* ``"cross_entropy"``: ``y ~ Categorical(softmax(logits))`` per row (class dimension 1, as
  ``F.cross_entropy``), loss ``F.cross_entropy(logits, y, reduction=...)``.
* ``"mse"``: per example, ``F.mse_loss`` with ``reduction="mean"`` is the negative log-likelihood of a Gaussian with
  variance ``D/2`` per output (``D`` outputs per example); with ``"sum"`` the variance is ``1/2``. We sample
  ``y = out + sqrt(variance) * eps`` and apply ``F.mse_loss(out, y, reduction=...)``.
* ``"bernoulli"``: ``y ~ Bernoulli(sigmoid(out))`` elementwise, loss
  ``F.binary_cross_entropy_with_logits(out, y, reduction=...)``; with ``"mean"`` (over all elements) it is scaled by
  ``sqrt(D)`` so that, like the ``"mse"`` case, the statistics match the element-mean loss's GGN
  ``diag(s (1 - s)) / numel`` (``D`` outputs per example).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sampled_loss", "LOSSES"]

LOSSES = ("cross_entropy", "mse", "bernoulli")


def sampled_loss(outputs: Tensor, *, loss: str = "cross_entropy", reduction: str = "mean",
                 generator: torch.Generator | None = None) -> Tensor:
    """The loss on labels sampled from the model's predictive distribution (see module docstring)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    detached = outputs.detach()
    if loss == "cross_entropy":
        if outputs.dim() < 2:
            raise ValueError("cross_entropy expects logits of shape (N, C, ...)")
        logits = detached.movedim(1, -1).reshape(-1, detached.shape[1]).float()
        labels = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).reshape(-1)
        labels = labels.reshape(detached.movedim(1, -1).shape[:-1])
        return F.cross_entropy(outputs, labels, reduction=reduction)
    if loss == "mse":
        per_example = detached[0].numel() if detached.dim() > 1 else 1
        variance = per_example / 2 if reduction == "mean" else 0.5
        noise = torch.randn(detached.shape, generator=generator, dtype=detached.dtype, device=detached.device)
        return F.mse_loss(outputs, detached + math.sqrt(variance) * noise, reduction=reduction)
    if loss == "bernoulli":
        probabilities = torch.sigmoid(detached.float())
        labels = torch.bernoulli(probabilities, generator=generator).to(outputs.dtype)
        scale = math.sqrt(detached[0].numel() if detached.dim() > 1 else 1) if reduction == "mean" else 1.0
        return scale * F.binary_cross_entropy_with_logits(outputs, labels, reduction=reduction)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
