"""``nn.Linear`` adapter: any number of leading dimensions, folded into rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import ModuleAdapter

__all__ = ["LinearAdapter"]


class LinearAdapter(ModuleAdapter):
    """``a = [x, 1]`` flattened to ``(N, d_in[+1])``; ``g = dL/dy`` flattened to ``(N, d_out)``."""

    module: nn.Linear

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def a_rows(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def g_rows(self, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2 and relatives): ``y = x @ W + b`` with ``W`` of shape ``(nx, nf)``, recognised
    by its class name and structure (``nf`` attribute, 2-d weight ``(nx, nf)``) without importing ``transformers``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[1] == module.nf)


class TransposedLinearAdapter(LinearAdapter):
    """A linear layer storing its weight transposed (``(d_in, d_out)``, Hugging Face ``Conv1D``): the same rows as
    ``nn.Linear``; the gradient matrix is ``W.grad^T`` (``(d_out, d_in[+1])``)."""

    @property
    def a_dim(self) -> int:
        return self.weight.shape[0] + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.weight.shape[1]

    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        w = grads[0]
        if w is None:
            return None
        mat = w.T
        if self.has_bias:
            b = grads[1]
            b = torch.zeros_like(mat[:, 0]) if b is None else b
            mat = torch.cat([mat, b.reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat.contiguous()

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        if not self.has_bias:
            return [mat.T]
        return [mat[:, :-1].T, mat[:, -1].reshape(self.bias.shape)]
