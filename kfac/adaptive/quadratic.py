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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .._tensor import all_finite, differentiable_kernels
from ..distributed.fsdp import sharded_parameters
from ..distributed.sharded_jvp import sharded_output_jvps
from .losses import hessian_vector_product

logger = logging.getLogger(__name__)

__all__ = ["ParameterSpace", "QuadraticModel", "batch_statistics_only", "local_gram", "model_outputs", "output_jvps", "quadratic_model", "levenberg_marquardt"]

Direction = Mapping[str, Tensor]
"""A parameter-space direction: ``{parameter name (as in named_parameters): tensor of its shape}``; parameters
left out are zero along it."""


def model_outputs(result: Any) -> list[Tensor]:
    """The tensors of a forward pass's result that a loss is computed from: the tensor itself, the ``logits`` of a
    Hugging Face ``ModelOutput`` (or of a dict), else every floating-point tensor of a tuple, list or dict."""
    if isinstance(result, Tensor):
        return [result]
    logits = result.get("logits") if isinstance(result, Mapping) else getattr(result, "logits", None)
    if isinstance(logits, Tensor):
        return [logits]
    items = list(result.values()) if isinstance(result, Mapping) else list(result) \
        if isinstance(result, (tuple, list)) else []
    tensors = [t for t in items if isinstance(t, Tensor) and t.is_floating_point()]
    if not tensors:
        raise TypeError(f"adaptive K-FAC: the model's forward pass returned {type(result).__name__} without "
                        "floating-point tensors (a tensor, a ModelOutput with logits, or a tuple/dict of tensors)")
    return tensors


def output_jvps(model: nn.Module, args: Sequence[Any], directions: Sequence[Direction],
                kwargs: Mapping[str, Any] | None = None) -> tuple[list[Tensor], list[list[Tensor]]]:
    """The outputs ``z = model(*args, **kwargs)`` (as :func:`model_outputs` lists them) and, for each direction
    ``v``, ``J v`` per output (forward-mode AD, one pass batched over the directions where ``vmap`` can batch the
    model, else one pass each; where an operator has no forward-mode derivative, reverse-over-reverse).
    Attention runs PyTorch's composite (math) kernel and CPU recurrent layers their native kernel, which have
    forward-mode derivatives. Batch-norm layers in training mode use the batch statistics as in training, without
    updating their running statistics (nothing of the model changes)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted({n for d in directions for n in d} - set(params))
    if unknown:
        raise ValueError(f"directions name parameters the model does not train: {unknown}")

    def outputs(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return tuple(model_outputs(functional_call(model, p, tuple(args), dict(kwargs or {}))))

    if sharded_parameters(params.items()):  # FSDP2: the model's own forward pass with dual parameters
        with batch_statistics_only(model), differentiable_kernels():
            return sharded_output_jvps(model, lambda: model_outputs(model(*args, **dict(kwargs or {}))), directions)
    tangents = [{n: d[n].to(p.dtype) if n in d else torch.zeros_like(p) for n, p in params.items()}
                for d in directions]
    with batch_statistics_only(model):
        if model not in _COMPOSITE:
            try:
                return _output_jvps(outputs, params, tangents, reverse_fallback=False)
            except NotImplementedError as exc:  # a fused kernel without a forward-mode derivative
                logger.debug("kfac: %s; JVPs through composite kernels from now on", exc)
                _COMPOSITE.add(model)
        with differentiable_kernels():
            return _output_jvps(outputs, params, tangents, reverse_fallback=True)


_COMPOSITE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Models whose forward has an operator without a forward-mode derivative (tried once, then remembered)."""


def _output_jvps(outputs: Callable[[dict[str, Tensor]], tuple[Tensor, ...]], params: dict[str, Tensor],
                 tangents: list[dict[str, Tensor]], *, reverse_fallback: bool,
                 ) -> tuple[list[Tensor], list[list[Tensor]]]:
    if not tangents:
        with torch.no_grad():
            return list(outputs(params)), []
    if len(tangents) > 1:
        # one forward pass for all directions (vmap over the tangents; the primal is computed once)
        stacked = {n: torch.stack([t[n] for t in tangents]) for n in params}
        try:
            dims: Any = (None, 0)  # the outputs are the same for every direction
            result = vmap(lambda t: jvp(outputs, (params,), (t,)), randomness="same", out_dims=dims)(stacked)
            return list(result[0]), [[jv[i] for jv in result[1]] for i in range(len(tangents))]
        except (RuntimeError, ValueError) as exc:  # an op vmap cannot batch
            logger.debug("kfac: batched JVPs failed (%s); one pass per direction", exc)
    results = [_jvp(outputs, params, t, reverse_fallback) for t in tangents]
    return list(results[0][0]), [list(r[1]) for r in results]


def _jvp(f: Any, params: dict[str, Tensor], tangent: dict[str, Tensor], reverse_fallback: bool) -> tuple[Any, Any]:
    """``(f(params), J tangent)``: forward mode, or (``reverse_fallback``) reverse-over-reverse where an operator
    lacks it: ``J t`` is the derivative of ``u -> J^T u`` applied to ``t``."""
    try:
        result = jvp(f, (params,), (tangent,))
        return result[0], result[1]
    except NotImplementedError as exc:
        if not reverse_fallback:
            raise
        logger.debug("kfac: forward-mode AD unavailable (%s); reverse-over-reverse products", exc)
    out, pullback = vjp(f, params)[:2]
    transpose = vjp(lambda u: pullback(u)[0], tuple(torch.zeros_like(o) for o in out))[1]
    return out, transpose(tangent)[0]


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
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


def quadratic_model(loss: str | Callable[[list[Tensor]], list[Tensor]], outputs: Tensor | Sequence[Tensor],
                    products: Sequence[Tensor] | Sequence[Sequence[Tensor]], directions: Sequence[Direction],
                    gradient: Direction, weight_decay: Mapping[str, float] | None = None, *,
                    space: ParameterSpace | None = None) -> QuadraticModel:
    """The model over ``directions`` from the outputs, their Jacobian-vector products along each direction
    (``products[i]``: one tensor per output) and the gradient (float64 reductions). ``loss`` applies the output
    Hessian: a name of :mod:`kfac.adaptive.losses` or ``u -> H u`` over the outputs (e.g.
    :meth:`kfac.adaptive.output_loss.OutputLoss.hvp`). ``weight_decay`` ``{parameter: η}`` adds ``η ‖δ‖²/2`` of
    those parameters to the curvature (the gradient must include ``η θ``). ``space`` forms the parameter-space
    products (whole tensors by default; sharded ones with :func:`kfac.distributed.sharded_jvp.sharded_gram`)."""
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    prods = [[p] if isinstance(p, Tensor) else list(p) for p in products]
    if isinstance(loss, str):
        name = loss
        hv = [[hessian_vector_product(name, z, jv) for z, jv in zip(outs, p)] for p in prods]
    else:
        hv = [loss(p) for p in prods]
    rows = torch.stack([torch.cat([jv.reshape(-1).double() for jv in p]) for p in prods])    # J v_i
    hrows = torch.stack([torch.cat([h.reshape(-1).double() for h in p]) for p in hv])       # H J v_i
    curvature = rows @ hrows.T
    curvature = (0.5 * (curvature + curvature.T)).cpu()
    k = len(directions)
    scaled = [{n: d[n] * eta ** 0.5 for n, eta in (weight_decay or {}).items() if n in d and eta}
              for d in directions]
    decayed = any(scaled)
    gram = (space or ParameterSpace()).gram([gradient, *directions, *(scaled if decayed else [])]).cpu()
    if decayed:
        curvature = curvature + gram[1 + k:, 1 + k:]
    return QuadraticModel(curvature=curvature, gram=gram[1:1 + k, 1:1 + k].clone(), linear=gram[1:1 + k, 0].clone())


def local_gram(vectors: Sequence[Direction]) -> Tensor:
    """``G_ij = v_i^T v_j`` (float64) of whole tensors over the union of the vectors' parameters."""
    flat = _flatten(vectors)
    return flat @ flat.T


@dataclass(frozen=True)
class ParameterSpace:
    """How the quadratic model forms parameter-space quantities: ``gram`` (the products ``v_i^T v_j`` of
    directions, float64) and ``all_finite`` (whether a direction is finite, the same answer on every rank)."""

    gram: Callable[[Sequence[Direction]], Tensor] = local_gram
    all_finite: Callable[[Iterable[Tensor]], bool] = all_finite


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
