"""Per-example gradients of tracked layers from hook data (no per-parameter ``vmap``, no extra backward).

Inside :class:`capture`, a forward hook keeps each tracked layer's input and a tensor hook its output gradient;
after the backward pass of ``loss.sum()`` the layer's per-example rows are ``a`` (``N x T x a_dim``) and ``g`` (``N x T x
g_dim``), and example ``n``'s gradient matrix is ``V_n = sum_t g_nt a_nt^T``. Rows are in *true gradient units*:
the adapters' internal row scaling (KAISA's ``1/S`` per convolution position) is undone, so ``V_n`` is exactly
``d loss_n / d W`` in the ``(g_dim, a_dim)`` layout (bias as the last column).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import ModuleAdapter

__all__ = ["capture", "example_matrices"]


class capture:  # noqa: N801 (a context manager used like a function)
    """``with capture(adapters, dtype) as cap: torch.autograd.grad(loss.sum(), cap.outputs)``; then
    ``cap.rows[name] = (a, g)``. Differentiating the layers' outputs, not their parameters, computes no parameter
    gradient and needs no whole parameter (FSDP2 keeps them sharded outside forward and backward)."""

    def __init__(self, adapters: Mapping[str, ModuleAdapter], dtype: torch.dtype) -> None:
        self.adapters, self.dtype = dict(adapters), dtype
        self.inputs: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.outputs: list[Tensor] = []  # what the backward pass differentiates (no parameter gradients needed)
        self._handles: list[Any] = []

    def __enter__(self) -> "capture":
        for name, adapter in self.adapters.items():
            self._handles += adapter.observe(functools.partial(self._forward, name))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        # the outputs' tensor hooks (held in C++, out of the garbage collector's sight) refer back to this object:
        # dropping the outputs breaks that cycle, which otherwise kept every batch's rows alive
        self.outputs.clear()

    def _forward(self, name: str, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
        if name in self.inputs:
            raise RuntimeError(f"influence: layer {name!r} ran forward() twice in one batch; layers applied several "
                               "times per example are not supported")
        self.inputs[name] = inputs[0].detach()
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(functools.partial(self._backward, name))
            self.outputs.append(output)

    def _backward(self, name: str, grad: Tensor) -> None:
        self.grads[name] = grad.detach()

    @property
    def rows(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (a, g)}`` per-example rows in true gradient units (layers that got a gradient)."""
        out = {}
        for name, x in self.inputs.items():
            if name not in self.grads:
                continue
            adapter = self.adapters[name]
            with torch.autocast(device_type=x.device.type, enabled=False):
                a, g = adapter.example_rows(x, self.grads[name], self.dtype)
            scale = adapter.example_scale(a.shape[1])
            out[name] = (a * scale, g * scale) if scale != 1 else (a, g)
        return out


def example_matrices(a: Tensor, g: Tensor) -> Tensor:
    """``V_n = sum_t g_nt a_nt^T`` for rows ``a`` (``N x T x a_dim``) and ``g`` (``N x T x g_dim``): ``N x g_dim x
    a_dim``."""
    return g.transpose(1, 2) @ a
