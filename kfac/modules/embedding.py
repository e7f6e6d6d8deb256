"""``nn.Embedding`` adapter: the layer is a Linear on one-hot inputs, so ``A`` is diagonal (token counts).

The weight gradient matrix is ``weight.grad.T`` of shape ``(embedding_dim, num_embeddings)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ModuleAdapter, Stat

__all__ = ["EmbeddingAdapter"]


class EmbeddingAdapter(ModuleAdapter):
    module: nn.Embedding
    a_diagonal = True

    @staticmethod
    def unsupported_reason(module: nn.Embedding) -> str | None:
        if module.sparse:
            return "Embedding with sparse=True gradients is not supported"
        return None

    @property
    def has_bias(self) -> bool:
        return False

    @property
    def a_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.module.embedding_dim

    def a_rows(self, x: Tensor) -> Tensor:  # one-hot rows; only used by reference code
        return nn.functional.one_hot(x.reshape(-1), self.a_dim)

    def a_stat(self, x: Tensor, dtype: torch.dtype) -> Stat:
        idx = x.reshape(-1)
        counts = torch.bincount(idx, minlength=self.a_dim).to(dtype)
        return counts, idx.numel()

    def g_rows(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])

    def grad_matrix(self) -> Tensor | None:
        w = self.module.weight
        return None if w.grad is None else w.grad.T

    def grad_targets(self, mat: Tensor) -> list[tuple[Tensor, Tensor]]:
        grad = self.module.weight.grad
        assert grad is not None  # mat came from grad_matrix(), which needs the weight's gradient
        return [(grad, mat.T)]
