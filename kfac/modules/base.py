"""Module adapters: how a layer type maps to Kronecker factors.

Conventions (shared by every adapter; ``units="kaisa"`` equals KAISA / kfac-pytorch 0.4.2):

* A layer's weight gradient is viewed as a matrix ``V`` of shape ``(d_out, d_in)``, where ``d_in`` includes
  a trailing ones column when the layer has a bias (so the bias gradient is ``V[:, -1]``).
* ``A_batch = a^T a / N`` with ``a`` the ``(N, d_in)`` rows built from the layer input.
* ``G_batch = g^T g / N`` with ``g`` the ``(N, d_out)`` rows built from the gradient w.r.t. the layer output as
  autograd delivers it (KAISA's units; convolutions also divide each row of ``a`` and ``g`` by the number of
  positions ``S``).
* Curvature units (``units="curvature"``): ``G_batch = g^T g`` (a sum) and no position scaling. For a loss
  ``L`` whose gradients are back-propagated (the batch mean, with any normalisation), ``A ⊗ G`` then approximates
  the block ``sum_n ∇_W L_n ∇_W L_n^T`` of the curvature (``L_n`` example ``n``'s share of ``L``; with the
  Monte-Carlo Fisher, the GGN ``J^T H J``): exactly for one example with one row, by K-FAC's independence
  assumption for a batch, K-FAC-expand for rows over sequences (Eschenhagen et al. 2023) and KFC's for
  convolutions (Grosse & Martens 2016: ``Ω ⊗ Γ`` with ``Ω = E[Σ_t a a^T]``, ``Γ = E[Σ_t g g^T] / S``). Every
  layer type is in the same units, so one step size and one relative damping fit them all. Layers whose
  gradient-side factor is ``A`` (normalisation layers, :attr:`ModuleAdapter.gradient_power`) sum that one.
* Adapters return *sums* ``a^T a`` together with the row count ``N``, so statistics from several micro-batches
  add up to those of the concatenated batch (computed by :func:`kfac.ext.sym_outer_update`: one triangle when the
  C++ extension is loaded).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import ext

__all__ = ["ModuleAdapter", "DiagonalAdapter", "Stat"]

Stat = tuple[Tensor, int]
"""A sufficient statistic ``(sum of row outer products, number of rows)``; diagonal factors sum squares."""


class ModuleAdapter(ABC):
    """Adapter for one module instance: factor statistics and gradient-matrix views."""

    a_diagonal: bool = False
    """Whether ``A`` is diagonal (stored as a vector), e.g. for embeddings."""

    stats_from_backward: bool = False
    """Whether both statistics come from :meth:`backward_stats` (the layer's input and output gradient together)
    instead of ``a_stat`` in the forward pass and ``g_stat`` in the backward pass (with a :attr:`gradient_power`
    saying where the gradients went)."""

    gradient_power: tuple[int, int] = (0, 2)
    """Powers of the loss-gradient scale carried by ``(A, G)``: ``G`` holds squared gradients, ``A`` none; an
    adapter whose statistics come from gradients differently says so (the reduction corrects by these powers)."""

    position_scaling: bool = True
    """Whether rows over positions are divided by their number (KAISA's convolution convention; the preconditioner
    turns it off in curvature units)."""

    per_example: bool = True
    """Whether :meth:`example_rows` gives per-example gradients ``V_n = sum_t g_nt a_nt^T`` (EK-FAC corrections
    and influence need them)."""

    example_dim: int = 0
    """Where examples lie in a batched input: 0, or 1 for the ``(T, N, ...)`` inputs of a sequence-first model
    (set by :func:`kfac.tracking.track_layers` where the model declares ``batch_first=False``)."""

    feature_dims: int = 1
    """Trailing input dimensions one row spans (features: 1; token ids: 0); the dimensions before them are the
    example and position dimensions."""

    shardable: bool = True
    """Whether the block works on FSDP2-sharded (``DTensor``) parameters: its statistics never read the
    parameters outside the module's forward (blocks that re-run the module with ``torch.func`` do)."""

    absent_from_old_checkpoints: bool = False
    """Whether earlier versions left layers of this kind untracked: a checkpoint without them still loads, and
    they start from fresh factors (e.g. loose parameters' blocks)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    def observe(self, callback: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]) -> list[Any]:
        """Call ``callback(module, args, kwargs, output)`` on every forward use of the layer; returns the hook
        handles. Default: a forward hook on the module (layers applied functionally by a parent override this)."""
        return [self.module.register_forward_hook(callback, with_kwargs=True)]

    @property
    def weight(self) -> nn.Parameter:
        """The module's weight (every supported layer type registers one)."""
        # nn.Module.__getattr__ is typed ``Tensor | Module``; a supported layer's ``weight`` is a parameter
        return cast(nn.Parameter, self.module.weight)

    @property
    def bias(self) -> nn.Parameter:
        """The module's bias; only valid when :attr:`has_bias`."""
        return cast(nn.Parameter, self.module.bias)  # as for :attr:`weight`

    @property
    @abstractmethod
    def a_dim(self) -> int:
        """Size of ``A`` (input features, plus one for the bias column)."""

    @property
    @abstractmethod
    def g_dim(self) -> int:
        """Size of ``G`` (output features)."""

    @abstractmethod
    def a_rows(self, x: Tensor) -> Tensor:
        """Input rows ``a`` of shape ``(N, a_dim)`` (already scaled as the convention requires)."""

    @abstractmethod
    def g_rows(self, g: Tensor) -> Tensor:
        """Output-gradient rows ``g`` of shape ``(N, g_dim)``."""

    def a_rows_unscaled(self, x: Tensor) -> tuple[Tensor, float]:
        """``(rows, s)`` with ``a_rows(x) == rows / s``: adapters whose convention divides every row by ``s``
        override this, so that statistics fold ``1/s^2`` into the product instead of writing a scaled copy."""
        return self.a_rows(x), 1.0

    def g_rows_unscaled(self, g: Tensor) -> tuple[Tensor, float]:
        """``(rows, s)`` with ``g_rows(g) == rows / s`` (see :meth:`a_rows_unscaled`)."""
        return self.g_rows(g), 1.0

    def a_stat(self, x: Tensor, dtype: torch.dtype) -> Stat:
        rows, s = self.a_rows_unscaled(x)
        rows = rows.to(dtype)
        return ext.sym_outer_update(rows, alpha=1.0 / s ** 2), rows.shape[0]

    def g_stat(self, g: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None) -> Stat:
        """``(g^T g, N)`` of the rows of ``g / scale`` (``scale``: an AMP loss scale to undo)."""
        rows, s = self.g_rows_unscaled(g)
        rows = rows.to(dtype)
        if scale is not None:
            rows = rows / scale
        return ext.sym_outer_update(rows, alpha=1.0 / s ** 2), rows.shape[0]

    def backward_stats(self, x: Tensor, g: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None,
                       ) -> tuple[Stat, Stat]:
        """``(A statistic, G statistic)`` from the input and the output gradient (adapters with
        :attr:`stats_from_backward`)."""
        raise NotImplementedError(f"{type(self).__name__} collects its statistics in the forward pass")

    def num_examples(self, x: Tensor) -> int:
        """Examples in a layer input (after :meth:`examples_first`): its leading dimension (1 for an unbatched
        input)."""
        return x.shape[0] if x.dim() > self.feature_dims else 1

    def examples_first(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and the output gradient ``g`` with the examples' dimension first (a sequence-first input is
        transposed)."""
        if self.example_dim and x.dim() - self.feature_dims > self.example_dim:
            return x.movedim(self.example_dim, 0), g.movedim(self.example_dim, 0)
        return x, g

    def example_rows(self, x: Tensor, g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-example rows ``a`` (``N x T x a_dim``) and ``g`` (``N x T x g_dim``) of an input ``x`` and the
        gradient ``g`` w.r.t. the matching output: example ``n``'s gradient matrix is ``sum_t g[n,t] a[n,t]^T``
        (in the adapter's row scaling). A batch of no examples gives ``0 x 1 x dim`` rows (``T = 1``: callers
        divide by ``T``)."""
        x, g = self.examples_first(x, g)
        n = self.num_examples(x)
        a, rows = self.a_rows(x).to(dtype), self.g_rows(g).to(dtype)
        if n == 0:  # reshape(0, -1, d) is ambiguous
            return a.reshape(0, 1, a.shape[-1]), rows.reshape(0, 1, rows.shape[-1])
        return a.reshape(n, -1, a.shape[-1]), rows.reshape(n, -1, rows.shape[-1])

    def example_scale(self, rows_per_example: int) -> float:
        """Factor that turns this adapter's rows into true-gradient rows (``sum_t g_t a_t^T = dL/dW``): 1, except
        where rows are rescaled by convention (Conv2d divides each by the number of positions)."""
        return 1.0

    def parameters(self) -> list[nn.Parameter]:
        params = [self.weight]
        if self.has_bias:
            params.append(self.bias)
        return params

    def grad_matrix(self) -> Tensor | None:
        """The gradient as a ``(g_dim, a_dim)`` matrix, or ``None`` if the weight has no gradient."""
        return self.matrix_of([p.grad for p in self.parameters()])

    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        """The ``(g_dim, a_dim)`` matrix of per-parameter tensors shaped like :meth:`parameters` (``None`` where a
        parameter has no gradient: zeros; ``None`` if the weight has none). Inverse: :meth:`split_matrix`."""
        w = grads[0]
        if w is None:
            return None
        mat = w.reshape(w.shape[0], -1)
        if self.has_bias:
            b = grads[1]
            b = torch.zeros_like(w[:, :1].reshape(-1)) if b is None else b
            mat = torch.cat([mat, b.reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        """A ``(g_dim, a_dim)`` matrix as per-parameter tensors shaped like :meth:`parameters` (views where the
        layout allows)."""
        w = self.weight
        if not self.has_bias:
            return [mat.reshape(w.shape)]
        return [mat[:, :-1].reshape(w.shape), mat[:, -1].reshape(self.bias.shape)]

    def grad_targets(self, mat: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(parameter .grad, matching view of mat)`` pairs that :meth:`set_grad_matrix` copies (batched by the
        preconditioner into one ``_foreach_copy_``); parameters without a gradient are left out."""
        return [(p.grad, t) for p, t in zip(self.parameters(), self.split_matrix(mat)) if p.grad is not None]

    def set_grad_matrix(self, mat: Tensor) -> None:
        """Write a ``(g_dim, a_dim)`` matrix back into the parameters' ``.grad`` (in place)."""
        for dst, src in self.grad_targets(mat):
            dst.copy_(src)


class DiagonalAdapter(ModuleAdapter):
    """A diagonal block from per-example gradients (normalisation layers, loose parameters): with ``v_n`` example
    ``n``'s gradient of the block's entries (``(N, a_dim)`` from :meth:`per_example_gradients`), ``A`` sums
    ``v_n²`` over examples and ``G = 1`` (the gradient matrix is one row). Not for EK-FAC or influence. A block
    that cannot give per-example gradients reports non-finite statistics with a ``refusal`` reason, and the
    preconditioner untracks it, warning with that reason."""

    a_diagonal = True
    stats_from_backward = True
    gradient_power = (2, 0)
    per_example = False

    @property
    def g_dim(self) -> int:
        return 1

    def a_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} collects its statistics from per-example gradients")

    def g_rows(self, g: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} collects its statistics from per-example gradients")

    def per_example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """``v_n`` per example, ``(N, a_dim)``."""
        raise NotImplementedError

    def backward_stats(self, x: Tensor, g: Tensor, dtype: torch.dtype, scale: Tensor | float | None = None,
                       ) -> tuple[Stat, Stat]:
        return self.diagonal_stats(self.per_example_gradients(x, g.to(dtype)), dtype, scale)

    @staticmethod
    def diagonal_stats(v: Tensor, dtype: torch.dtype, scale: Tensor | float | None) -> tuple[Stat, Stat]:
        """``(Σ_n v_n², N)`` and ``(N, N)`` from per-example gradients ``v`` (``scale``: an AMP loss scale)."""
        v = v.to(dtype)
        if scale is not None:
            v = v / scale
        n = v.shape[0]
        return (v.square().sum(0), n), (torch.full((1, 1), float(n), dtype=dtype, device=v.device), n)
