"""The exact local quadratic model of Martens & Grosse (ICML 2015, sections 6-7), on the current batch.

For the loss ``f`` at parameters ``θ`` with gradient ``g`` and a damped curvature ``C + λ I`` (``C`` the GGN, i.e.
the Fisher K-FAC approximates, see :mod:`kfac.adaptive.losses`), the model of an update ``δ`` is
``M(δ) = g^T δ + ½ δ^T (C + λ I) δ``. Restricted to ``δ = Σ_i c_i v_i`` over a few directions (the K-FAC direction
``Δ`` and the previous update ``δ₀``) it is ``M(c) = b^T c + ½ c^T (K + λ S) c`` with ``K_ij = v_i^T C v_j`` (exact,
through Jacobian-vector products of the network outputs: ``v^T C w = (J v)^T H (J w)``), ``S_ij = v_i^T v_j`` and
``b_i = g^T v_i``; its minimiser is ``c* = -(K + λ S)^{-1} b`` and the predicted change ``M(c*) = ½ b^T c*``.
The Levenberg-Marquardt rule then compares the actual change of ``f`` with ``M(c*)`` (``ρ``) to adapt ``λ``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from .losses import hessian_vector_product

logger = logging.getLogger(__name__)

__all__ = ["QuadraticModel", "output_jvps", "quadratic_model", "levenberg_marquardt"]

Direction = Mapping[str, Tensor]
"""A parameter-space direction: ``{parameter name (as in named_parameters): tensor of its shape}``; parameters
left out are zero along it."""


def output_jvps(model: nn.Module, args: Sequence[Any], directions: Sequence[Direction],
                kwargs: Mapping[str, Any] | None = None) -> tuple[Tensor, list[Tensor]]:
    """The outputs ``z = model(*args, **kwargs)`` and ``J v`` for each direction ``v`` (forward-mode AD, one pass
    batched over the directions where ``vmap`` can batch the model, else one pass each).
    Batch-norm layers in training mode use the batch statistics as in training, without updating their running
    statistics (nothing of the model changes)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted({n for d in directions for n in d} - set(params))
    if unknown:
        raise ValueError(f"directions name parameters the model does not train: {unknown}")
    def outputs(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, p, tuple(args), dict(kwargs or {}))
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return a tensor of outputs, got {type(out).__name__}")
        return out

    tangents = [{n: d[n].to(p.dtype) if n in d else torch.zeros_like(p) for n, p in params.items()}
                for d in directions]
    with _batch_statistics_only(model):
        if not tangents:
            with torch.no_grad():
                return outputs(params), []
        if len(tangents) > 1:
            # one forward pass for all directions (vmap over the tangents; the primal is computed once)
            stacked = {n: torch.stack([t[n] for t in tangents]) for n in params}
            try:
                dims: Any = (None, 0)  # the outputs are the same for every direction
                result = vmap(lambda t: jvp(outputs, (params,), (t,)), randomness="same", out_dims=dims)(stacked)
                return result[0], list(result[1].unbind(0))
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # an op vmap cannot batch
                logger.debug("kfac: batched JVPs failed (%s); one pass per direction", exc)
        results = [jvp(outputs, (params,), (t,)) for t in tangents]
    return results[0][0], [r[1] for r in results]


@contextlib.contextmanager
def _batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers in training mode normalise by the batch without touching their running statistics."""
    changed = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@dataclass
class QuadraticModel:
    """``M(c) = b^T c + ½ c^T (K + λ S) c`` over the directions (see the module docstring), float64."""

    curvature: Tensor  # K
    gram: Tensor       # S
    linear: Tensor     # b

    def solve(self, damping: float) -> Tensor:
        """The minimiser ``c* = -(K + λ S)^{-1} b`` (least squares where the system is singular)."""
        a = self.curvature + damping * self.gram
        b = -self.linear
        try:
            return torch.linalg.solve(a, b)
        except RuntimeError:  # singular (e.g. parallel directions): the minimum-norm solution
            return torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)

    def value(self, coefficients: Tensor, damping: float) -> Tensor:
        """``M(c)``: the model's predicted change of the loss for the update ``Σ c_i v_i``."""
        c = coefficients.to(self.linear.dtype)
        return self.linear @ c + 0.5 * c @ (self.curvature + damping * self.gram) @ c


def quadratic_model(loss: str, outputs: Tensor, products: Sequence[Tensor], directions: Sequence[Direction],
                    gradient: Direction) -> QuadraticModel:
    """The model over ``directions`` from the outputs, their Jacobian-vector products along each direction and the
    gradient (all float64 reductions)."""
    hv = [hessian_vector_product(loss, outputs, jv) for jv in products]
    rows = torch.stack([jv.reshape(-1).double() for jv in products])      # J v_i
    hrows = torch.stack([h.reshape(-1).double() for h in hv])             # H J v_i
    curvature = rows @ hrows.T
    flat = _flatten([gradient, *directions])
    vectors = flat[1:]
    return QuadraticModel(curvature=(0.5 * (curvature + curvature.T)).cpu(), gram=(vectors @ vectors.T).cpu(),
                          linear=(vectors @ flat[0]).cpu())


def levenberg_marquardt(damping: float, rho: float, *, omega: float, lower: float = 0.25, upper: float = 0.75,
                        min_damping: float = 1e-8, max_damping: float = 1e8) -> float:
    """Martens & Grosse's rule: ``λ ← ω λ`` when the model predicted well (``ρ > upper``), ``λ ← λ / ω`` when it
    did not (``ρ < lower``, or ``ρ`` not finite), kept within ``[min_damping, max_damping]``; ``0 < ω < 1``."""
    if not 0 < omega < 1:
        raise ValueError(f"omega must be in (0, 1), got {omega!r}")
    if rho != rho or rho < lower:  # NaN: a failed step is a bad prediction
        damping = damping / omega
    elif rho > upper:
        damping = damping * omega
    return min(max(damping, min_damping), max_damping)


def _flatten(directions: Sequence[Direction]) -> Tensor:
    """The directions as rows of one float64 matrix over the union of their parameters (zeros where absent)."""
    first: dict[str, Tensor] = {}  # each parameter's first tensor: its shape for the zeros where it is absent
    for d in directions:
        for n, t in d.items():
            first.setdefault(n, t)
    device = next(iter(first.values())).device
    return torch.stack([torch.cat([(d[n] if n in d else torch.zeros_like(ref)).reshape(-1).to(device, torch.float64)
                                   for n, ref in first.items()]) for d in directions])
