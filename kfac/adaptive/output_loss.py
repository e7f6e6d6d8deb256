"""The closure's loss as a function of the model's outputs: exact GGN products and Monte-Carlo samples of its
output Hessian.

Adaptive K-FAC's closure may compute any loss ``L(z_1, ..., z_k)`` of the outputs ``z_i`` of the model's forward
passes (``ignore_index``, label smoothing, class weights, shifted labels, sums of losses, several forwards). The
quadratic model's curvature is the generalised Gauss-Newton ``J^T H J`` of that very loss, ``H = ∂²L/∂z²``,
applied by double backward through the loss's own graph: ``H u = ∂/∂z (∇_z L · u)``. Parameters the loss reaches
other than through ``z`` (a regulariser) enter the gradient, not the GGN.

Monte-Carlo samples ``u`` with ``E[u u^T] = H`` (back-propagated through the network they give the factors ``G`` of
``fisher="mc"``, in the units of the curvature) need ``H``'s structure, named by ``AdaptiveConfig.loss``:

* ``"cross_entropy"``: per row along the class dimension ``H_r = ω_r (diag p - p p^T)``, ``p = softmax(z_r)``:
  true of a cross-entropy with any class weights, label smoothing, ignored rows (``ω_r = 0``) and normalisation.
  ``u_r = √ω_r (e_y - p)`` with ``y ~ p``, and ``ω_r = v^T H v / v^T (diag p - p p^T) v`` read along ``v = e_y - p``
  itself. The class dimension is the one along which ``∇_z L`` sums to zero in every row (the last, else dim 1,
  as ``F.cross_entropy`` takes ``(N, C, ...)``); if neither, the loss is not a cross-entropy of ``z`` and the
  Monte-Carlo Fisher is not defined for it: a clear error (use ``fisher="empirical"``).
* ``"mse"``, ``"bernoulli"`` (any loss with a diagonal ``H``): ``u = √h ⊙ ε`` with ``ε`` Rademacher signs and
  ``h = ε ⊙ H ε``, the exact diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["OutputLoss"]


class OutputLoss:
    """``L`` of one closure call as a function of the outputs it was computed from (see the module docstring).

    Build it before ``loss.backward(retain_graph=True)``; it keeps ``∇_z L`` with its graph until released.
    """

    def __init__(self, loss: Tensor, outputs: Sequence[Tensor]) -> None:
        self.outputs = list(outputs)
        live = [z for z in self.outputs if z.requires_grad]
        grads = iter(torch.autograd.grad(loss, live, create_graph=True, retain_graph=True, allow_unused=True)
                     if live else ())
        # ∇_z L per output (None: L does not use it), with its graph when L is not linear in z
        self.grads: list[Tensor | None] = [next(grads) if z.requires_grad else None for z in self.outputs]
        if all(g is None for g in self.grads):
            raise RuntimeError("adaptive K-FAC: the closure's loss does not depend on the outputs of the model's "
                               "forward pass (no curvature to model)")

    def hvp(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """``H u`` for ``u = vectors`` (one tensor per output, in the outputs' shapes; cross terms between
        outputs included)."""
        live = [i for i, g in enumerate(self.grads) if g is not None and g.requires_grad]  # else H = 0 there
        inputs = [i for i, z in enumerate(self.outputs) if z.requires_grad]
        out = [torch.zeros_like(v) for v in vectors]
        if live:
            hv = torch.autograd.grad([g for i in live if (g := self.grads[i]) is not None],
                                     [self.outputs[i] for i in inputs],
                                     grad_outputs=[vectors[i].to(self.outputs[i].dtype) for i in live],
                                     retain_graph=True, allow_unused=True)
            for i, h in zip(inputs, hv):
                if h is not None:
                    out[i] = h.detach().to(vectors[i].dtype)
        return out

    def sample(self, kind: str, generator: torch.Generator | None, class_dims: dict[int, int] | None = None,
               ) -> list[Tensor]:
        """Monte-Carlo samples ``u`` (one per output) with ``E[u u^T] = H`` for a loss of ``kind``'s structure.
        ``class_dims`` (cross-entropy): each output's class dimension, found on first use and kept there (early
        in training, when the check is clear of rounding)."""
        if kind == "cross_entropy":
            dims = class_dims if class_dims is not None else {}
            for i, (z, g) in enumerate(zip(self.outputs, self.grads)):
                if i not in dims and g is not None:
                    dims[i] = class_dim(z, g)
            return self._sample_softmax(generator, [dims.get(i, z.dim() - 1) for i, z in enumerate(self.outputs)])
        signs = [torch.randint(0, 2, z.shape, generator=generator, device=z.device, dtype=torch.int8).to(z.dtype)
                 * 2 - 1 for z in self.outputs]
        h = [(e * hv).clamp_min(0) for e, hv in zip(signs, self.hvp(signs))]  # exact diagonal (≥ 0 for a GGN)
        return [e * d.sqrt() for e, d in zip(signs, h)]

    def _sample_softmax(self, generator: torch.Generator | None, dims: list[int]) -> list[Tensor]:
        probes: list[Tensor] = []
        probs: list[Tensor] = []
        for z, dim in zip(self.outputs, dims):
            p = torch.softmax(z.detach().double().movedim(dim, -1), dim=-1)
            y = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])
            v = torch.nn.functional.one_hot(y, p.shape[-1]).to(p.dtype) - p
            probes.append(v.movedim(-1, dim).to(z.dtype))
            probs.append(p)
        samples = []
        for v, hv, p, dim in zip(probes, self.hvp(probes), probs, dims):
            v64 = v.double().movedim(dim, -1)
            curv = (v64 * hv.double().movedim(dim, -1)).sum(-1)           # v_r^T H_r v_r
            base = (p * v64.square()).sum(-1) - (p * v64).sum(-1).square()  # v_r^T (diag p - p p^T) v_r
            omega = torch.where(base > 1e-30, curv / base.clamp_min(1e-30), torch.zeros_like(base)).clamp_min(0)
            samples.append((v64 * omega.sqrt().unsqueeze(-1)).movedim(-1, dim).to(v.dtype))
        return samples


def class_dim(z: Tensor, grad: Tensor) -> int:
    """The dimension of ``z`` along which a cross-entropy's gradient ``grad`` sums to zero in every row (the last
    when both qualify): ``sum_rows |sum_c g| <= 5% sum |g|``, a margin for float32 rounding of confident rows."""
    if z.dim() < 2:
        raise ValueError(f"adaptive K-FAC: cross-entropy outputs need a class dimension, got shape {tuple(z.shape)}")
    g = grad.detach().double()
    total = float(g.abs().sum())
    candidates = [z.dim() - 1] + ([1] if z.dim() > 2 else [])
    ratios = {dim: float(g.sum(dim).abs().sum()) / total if total > 0 else 0.0 for dim in candidates}
    best = min(candidates, key=lambda d: ratios[d])
    if ratios[best] <= 0.05:
        return best
    raise ValueError("adaptive K-FAC with loss='cross_entropy' and fisher='mc': the closure's loss gradient does "
                     f"not sum to zero over the class dimension (last or dim 1) of the outputs {tuple(z.shape)}, so it "
                     "is not a cross-entropy of these logits and labels sampled from them do not give its Fisher; "
                     "set AdaptiveConfig(loss=...) to the loss's kind or use fisher='empirical'")
