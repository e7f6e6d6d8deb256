"""Normalisation layers: scale and shift with the exact diagonal of the Fisher from per-example gradients.
``A`` equals ``Σ_n v_n² / N`` with ``v_n`` the per-example gradients of the mean loss from ``torch.func`` (float64);
``G = 1``; the preconditioned gradient is ``g / (A + damping)`` entrywise; batch norm's per-example shares sum to
the batch gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
import kfac.modules

from helpers import HandLayerNorm, LlamaStyleRMSNorm, single_thread  # noqa: F401  (autouse fixture)

CASES = {
    "layernorm": (lambda: nn.LayerNorm(6), (8, 5, 6)),
    "layernorm_no_bias": (lambda: nn.LayerNorm(6, bias=False), (8, 6)),
    "groupnorm": (lambda: nn.GroupNorm(2, 6), (8, 6, 3, 3)),
}
if hasattr(nn, "RMSNorm"):
    CASES["rmsnorm"] = (lambda: nn.RMSNorm(6, eps=1e-6), (8, 5, 6))


OTHER_LIBRARIES = {  # matched by structure (kfac.modules.is_scale_shift); gradients by torch.func
    "llama_rmsnorm": (lambda: LlamaStyleRMSNorm(6), (8, 5, 6)),
    "gemma_rmsnorm": (lambda: LlamaStyleRMSNorm(6, gemma=True), (8, 5, 6)),
    "hand_layernorm": (lambda: HandLayerNorm(6), (8, 6)),
}
CASES.update(OTHER_LIBRARIES)


class Net(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return torch.tanh(self.norm(x)).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_diagonal_factor_equals_per_example_gradients_from_torch_func(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = Net(build()).double()
    with torch.no_grad():  # a non-trivial scale and shift
        model.norm.weight.uniform_(0.5, 1.5)
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.uniform_(-0.5, 0.5)
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.01)
    assert pre.layers == ["norm"] and pre.store["norm"].a_diagonal
    expected = kfac.modules.ScaleShiftAdapter if case in OTHER_LIBRARIES else kfac.modules.NormAdapter
    assert type(pre.adapters["norm"]) is expected
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randn(shape[0], 1, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    raw = torch.cat([p.grad.reshape(-1) for p in model.norm.parameters()]).clone()
    pre.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = shape[0]

    def loss(p, xi, yi):  # example i's share of the mean loss
        return F.mse_loss(functional_call(model, p, (xi[None],)), yi[None], reduction="sum") / n

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    v = torch.cat([per[k].reshape(n, -1) for k in ("norm.weight", "norm.bias") if k in per], 1)
    torch.testing.assert_close(v.sum(0), raw, rtol=1e-10, atol=1e-13)  # the shares add up to the gradient
    a = (v ** 2).sum(0) / n
    torch.testing.assert_close(pre.store["norm"].A, a, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pre.store["norm"].G, torch.ones(1, 1, dtype=torch.float64))
    got = torch.cat([p.grad.reshape(-1) for p in model.norm.parameters()])
    torch.testing.assert_close(got, raw / (a + 0.01), rtol=1e-10, atol=1e-13)


def test_batch_norm_per_example_shares_sum_to_the_batch_gradient():
    """Training mode (the only one K-FAC collects statistics in): x̂ from the batch statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 1)).double()
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    assert "1" in pre.layers
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    seen = {}
    model[1].register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    out = model(x)
    seen["out"].retain_grad()
    out.square().mean().backward()
    bn = model[1]
    xin = seen["x"].detach()
    mean, var = xin.mean((0, 2, 3), keepdim=True), xin.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = (xin - mean) / torch.sqrt(var + bn.eps)
    g = seen["out"].grad
    v = torch.cat([(g * xhat).sum((2, 3)), g.sum((2, 3))], 1)
    torch.testing.assert_close(v.sum(0), torch.cat([bn.weight.grad, bn.bias.grad]), rtol=1e-10, atol=1e-13)
    pre.step()
    torch.testing.assert_close(pre.store["1"].A, (v ** 2).sum(0) / 6, rtol=1e-10, atol=1e-14)


def test_other_libraries_norm_modules_with_running_statistics_or_extra_parameters_are_not_matched():
    """Examples must be independent (no running statistics) and the parameters exactly a scale and a shift."""
    class RunningNorm(HandLayerNorm):
        def __init__(self, d: int) -> None:
            super().__init__(d)
            self.register_buffer("running_mean", torch.zeros(d))

    class GatedNorm(HandLayerNorm):
        def __init__(self, d: int) -> None:
            super().__init__(d)
            self.gate = nn.Parameter(torch.ones(d))

    for module in (RunningNorm(4), GatedNorm(4)):
        assert not kfac.modules.is_scale_shift(module)
    assert kfac.modules.is_scale_shift(HandLayerNorm(4)) and not kfac.modules.is_scale_shift(nn.LayerNorm(4))
