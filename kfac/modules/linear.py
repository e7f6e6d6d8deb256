"""``nn.Linear`` adapter: any number of leading dimensions, folded into rows."""

from __future__ import annotations

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
