"""``nn.Embedding`` adapter: the layer is a Linear on one-hot inputs, so ``A`` is diagonal (token counts).

The weight gradient matrix is ``weight.grad.T`` of shape ``(embedding_dim, num_embeddings)``.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    feature_dims = 0  # token ids

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

    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        return None if grads[0] is None else grads[0].T

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        return [mat.T]
