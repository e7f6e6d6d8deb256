"""Tied weights: an ``nn.Embedding`` whose matrix an output layer reuses (``head.weight is embedding.weight``, the
usual language-model tie), with the curvature of *both* uses in one Kronecker block.

Layout: the embedding's (gradient matrix ``W.grad^T``, ``d x V``; ``A`` over the vocabulary, diagonal; ``G`` over
the ``d`` embedding dimensions). Each use contributes rows ``(a_i, g_i)`` with ``W.grad^T = Σ_i g_i a_iᵀ``:

* the embedding: ``a_i`` the one-hot token, ``g_i`` the gradient w.r.t. its output;
* the head (``logits = h Wᵀ (+ b)``; its bias is not in the block): ``a_i = δ_i``, the gradient w.r.t. the logits, and ``g_i = h_i``, its input --
  the roles of data and gradient are swapped, so the raw rows of the two uses differ in scale by the size of a
  loss gradient and pooling them as they are would let one use's cross terms swamp the other.

Each row pair is therefore *balanced* first: ``(a, g) -> (s a, g / s)`` with ``s² = |g| / |a|``, which leaves its
gradient contribution ``g aᵀ`` (and its exact curvature ``(a aᵀ) ⊗ (g gᵀ)``) unchanged and gives both sides the
same norm; then the rows of both uses are pooled as K-FAC pools the positions of a shared weight (K-FAC-expand):

``A = diag(Σ_i s_i² a_i²) / N``,  ``G = Σ_i g_i g_iᵀ / s_i² / N``  (``N`` rows of both uses),

so ``A ⊗ G`` approximates ``Σ_i (a_i a_iᵀ) ⊗ (g_i g_iᵀ) / N`` as K-FAC does, independent of which module was
registered first. The vocabulary factor is kept diagonal (the head's ``δ δᵀ`` by its diagonal), as the embedding's
own. Both factors carry one power of the loss-gradient scale (``gradient_power = (1, 1)``). Not for EK-FAC or
influence (no per-example rows in one layout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import Stat
from .embedding import EmbeddingAdapter

__all__ = ["TiedEmbeddingAdapter", "is_tied_head"]


def is_tied_head(embedding: nn.Module, head: nn.Module) -> bool:
    """Whether ``head`` is an ``nn.Linear`` applying ``embedding``'s matrix as its weight (a bias of the head, as
    BERT's, is not part of the block and keeps its plain gradient)."""
    return isinstance(embedding, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embedding.weight


class TiedEmbeddingAdapter(EmbeddingAdapter):
    """See the module docstring; ``head`` is the output layer sharing ``module``'s weight."""

    stats_from_backward = True
    gradient_power = (1, 1)
    per_example = False

    def __init__(self, module: nn.Module, head: nn.Module) -> None:
        if not is_tied_head(module, head):
            raise ValueError("TiedEmbeddingAdapter needs an nn.Embedding and an nn.Linear whose weight is the "
                             "embedding's")
        super().__init__(module)
        self.head = head

    def observe(self, callback: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]) -> list[Any]:
        """Both uses: the embedding's forward and the head's."""
        return [m.register_forward_hook(callback, with_kwargs=True) for m in (self.module, self.head)]

    def backward_stats(self, x: Tensor, g: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None,
                       ) -> tuple[Stat, Stat]:
        """Balanced statistics of one use: the embedding's (integer token ids ``x``) or the head's (its input)."""
        g = g.to(dtype)
        if scale is not None:
            g = g / scale
        if x.is_floating_point():  # the head: a = dL/dlogits (vocabulary), g-side = the hidden input
            a_rows = g.reshape(-1, self.a_dim)
            h = x.to(dtype).reshape(-1, self.g_dim)
            a_norm, h_norm = a_rows.norm(dim=1), h.norm(dim=1)
            a_stat = (a_rows.square() * _ratio(h_norm, a_norm)[:, None]).sum(0)
            g_stat = (h * _ratio(a_norm, h_norm)[:, None]).T @ h
            return (a_stat, a_rows.shape[0]), (g_stat, h.shape[0])
        ids = x.reshape(-1)  # the embedding: a = one-hot token (norm 1), g-side = dL/d(embedding output)
        rows = g.reshape(-1, self.g_dim)
        norm = rows.norm(dim=1)
        a_stat = torch.bincount(ids, weights=norm, minlength=self.a_dim).to(dtype)
        g_stat = (rows * _ratio(torch.ones_like(norm), norm)[:, None]).T @ rows
        return (a_stat, ids.numel()), (g_stat, ids.numel())


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den`` is 0 (a row with a zero side contributes nothing)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
