"""Normalisation layers (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d``, ``nn.RMSNorm``): their
per-channel scale ``γ`` and shift ``β`` with the *exact diagonal* of the Fisher, from per-example gradients.

With ``x̂`` the normalised input (recomputed exactly as the module normalises: over the normalised shape, the
group, or the batch statistics in training / the running ones in evaluation) and ``g`` the gradient w.r.t. the
output, example ``n``'s gradients are ``dγ_n = Σ_t g_nt ⊙ x̂_nt`` and ``dβ_n = Σ_t g_nt`` (sums over every position
of the example). The layer is a Kronecker block with a diagonal ``A`` over the ``(γ, β)`` entries,
``A = Σ_n v_n² / N`` (``v_n = [dγ_n, dβ_n]``, in the scale of the other layers' statistics: gradients of the mean
loss), and ``G = 1``; the gradient matrix is the row ``[γ.grad, β.grad]``. For batch norm in training the
examples are coupled through the batch statistics: ``v_n`` is the per-example share of the batch gradient
(they sum to it), not the gradient of example ``n``'s own loss. Not for EK-FAC or influence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DiagonalAdapter

__all__ = ["NormAdapter", "ScaleShiftAdapter", "is_norm", "is_scale_shift", "couples_examples", "probe_coupling"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, *_BATCH_NORMS) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm(module: nn.Module) -> bool:
    """A PyTorch normalisation layer (or a subclass that keeps its ``forward``) with a learnable scale
    (``elementwise_affine`` / ``affine``): its ``x̂`` is recomputed by formula."""
    base = next((t for t in _NORMS if isinstance(module, t)), None)
    return (base is not None and type(module).forward is base.forward
            and isinstance(getattr(module, "weight", None), nn.Parameter))


def couples_examples(module: Callable[[Tensor], Any], x: Tensor, out: Tensor | None = None, dim: int = 0) -> bool | None:
    """Whether ``module``'s output for one example depends on the other examples along ``dim`` of ``x`` (a
    normalisation over the batch): the batched output ``out`` (computed if not given) against the first and last
    examples run alone. ``None`` when it cannot tell (the module does not map ``x`` to a tensor of its shape)."""
    try:
        with torch.no_grad():
            out = module(x) if out is None else out
            if not isinstance(out, Tensor) or out.shape != x.shape or x.shape[dim] < 2:
                return None
            for i in (0, x.shape[dim] - 1):
                alone = module(x.narrow(dim, i, 1))
                if not torch.allclose(alone, out.narrow(dim, i, 1), rtol=1e-4, atol=1e-5):
                    return True
    except Exception:  # a probe the module does not accept says nothing about it
        return None
    return False


def probe_coupling(module: nn.Module) -> bool | None:
    """:func:`couples_examples` on small random inputs of the shapes a scale-and-shift module of ``d`` channels
    takes (``(4, 3, d)``, then channels first: ``(4, d, 3)``, ``(4, d, 2, 2)``); the first conclusive answer.
    The random numbers come from a private generator (the global one is left alone)."""
    w = cast(Tensor, module.weight)
    d = w.shape[0] if w.dim() == 1 else None
    gen = torch.Generator().manual_seed(0)
    for shape in ([(4, 3, *w.shape)] + ([(4, d, 3), (4, d, 2, 2)] if d is not None else [])):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(w.dtype).to(w.device)
        verdict = couples_examples(module, x)
        if verdict is not None:
            return verdict
    return None


class NormAdapter(DiagonalAdapter):
    """See the module docstring."""

    example_dim = 0
    """The examples' dimension of a ``(…, normalised)`` input: 0, or 1 inside a sequence-first container (set by
    :func:`kfac.tracking.track_layers`)."""

    @property
    def has_bias(self) -> bool:
        return isinstance(getattr(self.module, "bias", None), nn.Parameter)

    @property
    def a_dim(self) -> int:
        return self.weight.numel() * (1 + int(self.has_bias))

    def normalised(self, x: Tensor) -> Tensor:
        """``x̂`` as the module computes it (without its scale and shift)."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        if isinstance(m, _BATCH_NORMS):
            batch_stats = m.training or not m.track_running_stats
            return F.batch_norm(x, None if batch_stats else m.running_mean, None if batch_stats else m.running_var,
                                training=batch_stats, eps=m.eps)
        rms = cast(nn.RMSNorm, m)
        return F.rms_norm(x, rms.normalized_shape, eps=rms.eps)

    def per_example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        """``[dγ_n, dβ_n]`` per example, ``(N, a_dim)``."""
        x, g = self.examples_first(x, g)
        xhat = self.normalised(x.to(g.dtype))
        m = self.module
        if isinstance(m, (nn.GroupNorm, *_BATCH_NORMS)):  # channels at dim 1 of (N, C, *)
            dims = tuple(range(2, x.dim()))
            dgamma = (g * xhat).sum(dims) if dims else g * xhat
            dbeta = g.sum(dims) if dims else g
        else:  # LayerNorm / RMSNorm: the parameter spans the trailing normalised dims
            lead = x.dim() - self.weight.dim()
            n = x.shape[0] if lead >= 1 else 1
            shape = (n, -1, self.weight.numel())
            dgamma = (g * xhat).reshape(shape).sum(1)
            dbeta = g.reshape(shape).sum(1)
        return torch.cat([dgamma, dbeta], 1) if self.has_bias else dgamma

    def examples_first(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and ``g`` with the examples' dimension first (a sequence-first input is transposed)."""
        channels_first = isinstance(self.module, (nn.GroupNorm, *_BATCH_NORMS))  # always (N, C, *)
        if self.example_dim and not channels_first and x.dim() - self.weight.dim() > self.example_dim:
            return x.movedim(self.example_dim, 0), g.movedim(self.example_dim, 0)
        return x, g

    def matrix_of(self, grads: Sequence[Tensor | None]) -> Tensor | None:
        w = grads[0]
        if w is None:
            return None
        parts = [w.reshape(-1)]
        if self.has_bias:
            b = grads[1]
            parts.append(torch.zeros_like(parts[0]) if b is None else b.reshape(-1).to(w.dtype))
        return torch.cat(parts)[None]

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        w = self.weight
        c = w.numel()
        out = [mat[0, :c].reshape(w.shape)]
        if self.has_bias:
            out.append(mat[0, c:].reshape(self.bias.shape))
        return out


def is_scale_shift(module: nn.Module) -> bool:
    """A normalisation module whose ``x̂`` has no formula here: another library's (class name containing ``Norm``,
    e.g. Hugging Face's ``LlamaRMSNorm`` or ``T5LayerNorm``) or a subclass of a PyTorch norm other than batch norm
    that overrides ``forward`` (e.g. torchvision's ``LayerNorm2d``). No submodules, no running statistics, and a
    ``weight`` (1-d unless it subclasses a PyTorch norm) and at most a ``bias`` of its shape as only parameters.
    A module that normalises over the batch is refused by :meth:`ScaleShiftAdapter.unsupported_reason`."""
    if is_norm(module) or next(module.children(), None) is not None or isinstance(module, _BATCH_NORMS):
        return False
    subclass = isinstance(module, _NORMS)
    if not subclass and "norm" not in type(module).__name__.lower():
        return False
    if any(name.startswith("running_") for name, _ in module.named_buffers()):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.pop("weight", None), params.pop("bias", None)
    return (not params and weight is not None and (weight.dim() == 1 or subclass)
            and (bias is None or bias.shape == weight.shape))


class ScaleShiftAdapter(NormAdapter):
    """Normalisation modules of other libraries (:func:`is_scale_shift`): the same diagonal block as
    :class:`NormAdapter`, with the per-example gradients of the module's own forward taken by ``torch.func``
    (``vmap`` over examples of a ``vjp`` w.r.t. its parameters), so no formula per class is needed -- e.g. Gemma's
    ``x̂ (1 + γ)`` is handled as Llama's ``x̂ γ``. Costs one more forward of the module per statistics step.

    Examples must be independent: a module whose output for one example depends on the others (a normalisation
    over the batch) is refused when it is built (a probe on random inputs), or, where the probe cannot tell, at
    its first statistics (the per-example outputs against the batched one): it then reports non-finite
    statistics with :attr:`refusal` set, and the preconditioner untracks it, warning (the other layers stay)."""

    shardable = False  # re-runs the module with its parameters (torch.func)

    refusal: str | None = None
    checked: bool = False

    @staticmethod
    def unsupported_reason(module: nn.Module) -> str | None:
        if probe_coupling(module):
            return (f"{type(module).__name__} normalises over the batch (one example's output depends on the "
                    "others): no per-example statistics")
        return None

    def per_example_gradients(self, x: Tensor, g: Tensor) -> Tensor:
        from torch.func import functional_call, vjp, vmap

        x, g = self.examples_first(x, g)
        params = {k: p.detach().to(g.dtype) for k, p in self.module.named_parameters(recurse=False)}
        module = self.module

        def one(xi: Tensor, gi: Tensor) -> dict[str, Tensor]:
            pull = vjp(lambda p: functional_call(module, p, (xi[None],))[0], params)[1]
            return cast(dict[str, Tensor], pull(gi)[0])

        x = x.to(g.dtype)
        if not self.checked:  # once: one example's output must not depend on the others
            self.checked = True
            if x.dim() > 1 and couples_examples(functools.partial(functional_call, module, params), x):
                self.refusal = (f"{type(module).__name__} normalises over the batch (one example's output depends "
                                "on the others): no per-example statistics")
        if self.refusal is not None:
            return torch.full((x.shape[0] if x.dim() > 1 else 1, self.a_dim), float("nan"), dtype=g.dtype,
                              device=g.device)
        per = vmap(one)(x, g) if x.dim() > 1 else one(x[None], g[None])
        parts = [per["weight"].reshape(per["weight"].shape[0], -1)]
        if self.has_bias:
            parts.append(per["bias"].reshape(parts[0].shape[0], -1))
        return torch.cat(parts, 1)
