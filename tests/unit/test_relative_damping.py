"""``relative_damping=True``: the damping is in units of each layer's mean curvature eigenvalue, checked against a
dense float64 solve with the explicit Kronecker product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac

from helpers import single_thread  # noqa: F401  (autouse fixture)


def _step(method: str, damping: float, relative: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    pre = kfac.KFACPreconditioner(model, method=method, damping=damping, relative_damping=relative, kl_clip=None,
                                  factor_dtype=torch.float64, factor_decay=0.0)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    F.cross_entropy(model(x), y).backward()
    raw = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for n, m in (("0", model[0]),
                                                                                       ("2", model[2]))}
    pre.step()
    got = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for n, m in (("0", model[0]), ("2", model[2]))}
    return pre, raw, got


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_relative_damping_is_damping_times_the_mean_eigenvalue(method):
    pre, raw, got = _step(method, 0.1, True)
    for name in ("0", "2"):
        e = pre.store[name]
        if method == "eigen":
            curvature = torch.kron(e.A, e.G)  # vec column-major: (A ⊗ G) vec(V) = vec(G V A)
            mean = torch.trace(e.A) * torch.trace(e.G) / curvature.shape[0]
        else:  # EK-FAC: the corrected eigenvalues in the Kronecker eigenbasis
            basis = torch.kron(e.QA, e.QG)
            lam = e.extras["Lambda"] if "Lambda" in e.extras else torch.outer(e.dG, e.dA)
            curvature = basis @ torch.diag(lam.T.reshape(-1)) @ basis.T
            mean = lam.mean()
        want = torch.linalg.solve(curvature + 0.1 * mean * torch.eye(curvature.shape[0], dtype=torch.float64),
                                  raw[name].T.reshape(-1))
        torch.testing.assert_close(got[name].T.reshape(-1), want, rtol=1e-9, atol=1e-12)
        diag = pre.diag(damping=0.1)[name]
        dense = torch.linalg.inv(curvature + 0.1 * mean * torch.eye(curvature.shape[0], dtype=torch.float64))
        torch.testing.assert_close(diag.T.reshape(-1), dense.diagonal(), rtol=1e-9, atol=1e-12)


def test_relative_damping_does_not_depend_on_the_loss_scale():
    """Scaling the loss scales G and hence the eigenvalues: the relative damping follows, the direction is only
    rescaled (an absolute damping changes its shape)."""
    torch.manual_seed(0)
    outs = []
    for factor in (1.0, 1e-3):
        for relative in (True, False):
            torch.manual_seed(0)
            model = nn.Linear(5, 3).double()
            pre = kfac.KFACPreconditioner(model, damping=0.1 if relative else 1e-3, relative_damping=relative,
                                          kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
            x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
            (factor * F.cross_entropy(model(x), y)).backward()
            pre.step()
            outs.append(model.weight.grad / model.weight.grad.norm())
    relative_1, absolute_1, relative_small, absolute_small = outs
    torch.testing.assert_close(relative_small, relative_1, rtol=1e-9, atol=1e-12)
    assert (absolute_small - absolute_1).norm() > 1e-2


def test_relative_damping_with_the_inverse_method_is_an_error():
    with pytest.raises(ValueError, match="relative_damping"):
        kfac.KFACPreconditioner(nn.Linear(3, 2), method="inverse", relative_damping=True)
