"""``nn.Conv2d`` adapter (groups=1) via im2col patches.

With ``S`` the number of output positions per example, ``a`` holds the ``N*S`` im2col patches (plus a ones
column for the bias) divided by ``S`` and ``g`` the ``N*S`` output-gradient vectors divided by ``S``; both
factors are then normalised by ``N*S`` rows (KAISA's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModuleAdapter

__all__ = ["Conv2dAdapter"]


class Conv2dAdapter(ModuleAdapter):
    module: nn.Conv2d

    @staticmethod
    def unsupported_reason(module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} is not supported (only groups=1)"
        return None

    @property
    def a_dim(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Apply the module's padding explicitly when ``F.unfold`` cannot (string or non-zero modes)."""
        m = self.module
        if isinstance(m.padding, str):
            if m.padding == "valid":
                return x, (0, 0)
            pads: list[int] = []  # F.pad order: last dim first
            for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            return F.pad(x, pads, mode=mode), (0, 0)
        if m.padding_mode != "zeros":
            return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0, 0)
        return x, tuple(m.padding)  # type: ignore[return-value]

    def a_rows_unscaled(self, x: Tensor) -> tuple[Tensor, float]:
        """The ``(N*S, a_dim)`` im2col patch rows (ones column last with a bias) and ``S``."""
        m = self.module
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x, padding = self._padded(x)
        if tuple(m.kernel_size) == (1, 1) and tuple(padding) == (0, 0):  # a 1x1 patch is a pixel: no im2col
            x = x[:, :, ::m.stride[0], ::m.stride[1]]
            spatial = x.shape[2] * x.shape[3]
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        else:
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            spatial = patches.shape[-1]
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows, spatial

    def a_rows(self, x: Tensor) -> Tensor:
        rows, spatial = self.a_rows_unscaled(x)
        return rows / spatial

    def num_examples(self, x: Tensor) -> int:
        return x.shape[0] if x.dim() == 4 else 1

    def example_scale(self, rows_per_example: int) -> float:
        return float(rows_per_example)  # rows are patches / S and output gradients / S, with S positions

    def g_rows_unscaled(self, g: Tensor) -> tuple[Tensor, float]:
        """The ``(N*S, g_dim)`` output-gradient vectors and ``S``."""
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]), g.shape[2] * g.shape[3]

    def g_rows(self, g: Tensor) -> Tensor:
        rows, spatial = self.g_rows_unscaled(g)
        return rows / spatial
