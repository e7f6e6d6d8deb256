"""``nn.Conv1d`` / ``nn.Conv2d`` adapters via im2col patches (:class:`ConvAdapter`; grouped and depthwise
convolutions: :class:`GroupedConvAdapter`).

With ``S`` the number of output positions per example, ``a`` holds the ``N*S`` im2col patches (plus a ones
column for the bias) divided by ``S`` and ``g`` the ``N*S`` output-gradient vectors divided by ``S``; both
factors are then normalised by ``N*S`` rows (KAISA's convention; in curvature units nothing is divided by ``S``,
see :mod:`kfac.modules.base`). A 1-d convolution is the 2-d one over inputs of
height 1 (kernel ``(1, k)``), so both share one code path and one convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModuleAdapter

__all__ = ["ConvAdapter", "GroupedConvAdapter"]


class ConvAdapter(ModuleAdapter):
    module: nn.Conv1d | nn.Conv2d

    @staticmethod
    def unsupported_reason(module: nn.Conv1d | nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"{type(module).__name__} with groups={module.groups}: use GroupedConvAdapter"
        return None

    @property
    def spatial_dims(self) -> int:
        return 1 if isinstance(self.module, nn.Conv1d) else 2

    def _pair(self, value: tuple[int, ...], fill: int = 1) -> tuple[int, int]:
        """A 1-d convolution's parameter as the 2-d one over height 1 (``fill``: its height value)."""
        return (fill, value[0]) if self.spatial_dims == 1 else (value[0], value[1])

    @property
    def kernel(self) -> tuple[int, int]:
        return self._pair(tuple(self.module.kernel_size))

    @property
    def a_dim(self) -> int:
        kh, kw = self.kernel
        return self.module.in_channels // self.module.groups * kh * kw + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def _as_2d(self, t: Tensor) -> Tensor:
        """A batched ``(N, C, H, W)`` view of an input or output-gradient tensor (``(N, C, 1, L)`` for 1-d)."""
        if t.dim() == self.spatial_dims + 1:  # unbatched
            t = t.unsqueeze(0)
        return t.unsqueeze(2) if self.spatial_dims == 1 else t

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Apply the module's padding explicitly when ``F.unfold`` cannot (string or non-zero modes); ``x`` is the
        2-d view."""
        m = self.module
        if isinstance(m.padding, str):
            if m.padding == "valid":
                return x, (0, 0)
            pads: list[int] = []  # F.pad order: last dim first
            for k, d in zip(reversed(self.kernel), reversed(self._pair(tuple(m.dilation)))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            return F.pad(x, pads, mode=mode), (0, 0)
        padding = self._pair(tuple(m.padding), fill=0)
        if m.padding_mode != "zeros":
            pads = [padding[1], padding[1], padding[0], padding[0]]
            return F.pad(x, pads, mode=m.padding_mode), (0, 0)
        return x, padding

    def a_rows_unscaled(self, x: Tensor) -> tuple[Tensor, float]:
        """The im2col patch rows (ones column last with a bias) and ``S``: ``(N*S, a_dim)``, or every group's
        patches ``(N*S*groups, a_dim)`` for a grouped convolution."""
        m = self.module
        x, padding = self._padded(self._as_2d(x))
        stride = self._pair(tuple(m.stride))
        if self.kernel == (1, 1) and padding == (0, 0):  # a 1x1 patch is a pixel: no im2col
            patches = x[:, :, ::stride[0], ::stride[1]].flatten(2)
        else:
            patches = F.unfold(x, self.kernel, dilation=self._pair(tuple(m.dilation)), padding=padding, stride=stride)
        n, width, spatial = patches.shape[0], patches.shape[1] // m.groups, patches.shape[-1]  # channel-major
        rows = patches.reshape(n, m.groups, width, spatial).permute(0, 3, 1, 2).reshape(-1, width)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows, spatial if self.position_scaling else 1

    def a_rows(self, x: Tensor) -> Tensor:
        rows, spatial = self.a_rows_unscaled(x)
        return rows / spatial

    @property
    def feature_dims(self) -> int:  # type: ignore[override]  # one example's rows span (C, *spatial)
        return self.spatial_dims + 1

    def num_examples(self, x: Tensor) -> int:
        return x.shape[0] if x.dim() == self.spatial_dims + 2 else 1

    def example_scale(self, rows_per_example: int) -> float:
        # rows are patches / S and output gradients / S, with S positions (KAISA's units)
        return float(rows_per_example) if self.position_scaling else 1.0

    def g_rows_unscaled(self, g: Tensor) -> tuple[Tensor, float]:
        """The ``(N*S, g_dim)`` output-gradient vectors and ``S``."""
        g = self._as_2d(g)
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]), g.shape[2] * g.shape[3] if self.position_scaling else 1

    def g_rows(self, g: Tensor) -> Tensor:
        rows, spatial = self.g_rows_unscaled(g)
        return rows / spatial


class GroupedConvAdapter(ConvAdapter):
    """Grouped and depthwise ``nn.Conv1d`` / ``nn.Conv2d`` (``groups > 1``) as one Kronecker block with a
    *shared* ``A``: output channel ``o`` of group ``γ(o)`` sees only its group's patches ``a_{t,γ}``, so K-FAC's
    block-diagonal-over-groups curvature is ``blockdiag_γ(G_γ ⊗ A_γ)``; replacing every ``A_γ`` by their mean
    ``A = mean_γ A_γ`` (the rows of every group's patches, ``C_in/groups · k² [+1]`` wide) gives
    ``A ⊗ G`` with ``G`` block-diagonal over groups (cross-group entries zero; diagonal for depthwise convolutions).
    Exact where every group sees the same patches; otherwise an approximation on top of K-FAC's. The weight
    ``(C_out, C_in/groups, k...)`` is the ``(C_out, C_in/groups · k² [+1])`` gradient matrix as for ``groups=1``.
    Per-example rows do not have the ``V_n = Σ_t g a^T`` form here: EK-FAC and influence leave these layers out."""

    per_example = False

    @staticmethod
    def unsupported_reason(module: nn.Conv1d | nn.Conv2d) -> str | None:
        return None

    def g_stat(self, g: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None) -> tuple[Tensor, int]:
        """``(g^T g, N*S)`` restricted to the diagonal blocks of the groups (cross-group entries zero): one
        ``rows_γ^T rows_γ`` per group, a diagonal of squares for depthwise convolutions."""
        rows, s = self.g_rows_unscaled(g)
        rows = rows.to(dtype)
        if scale is not None:
            rows = rows / scale
        groups, width = self.module.groups, self.g_dim // self.module.groups
        if width == 1:  # depthwise: a diagonal
            return torch.diag(rows.square().sum(0) / s ** 2), rows.shape[0]
        blocks = rows.reshape(rows.shape[0], groups, width).transpose(0, 1)  # (groups, N*S, width)
        return torch.block_diag(*(blocks.transpose(1, 2) @ blocks / s ** 2)), rows.shape[0]

    def example_rows(self, x: Tensor, g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("grouped convolutions have no per-example rows of the V_n = sum_t g a^T form")
