"""Warm-started eigenbasis refresh (kfac.kronecker.methods.warm), against exact eigendecompositions and dense
Kronecker solves in float64.

The bound checked on a training trajectory: with ``K = A (x) G`` and ``K'`` the curvature the accepted
decompositions represent (``Q diag(d) Q^T`` per factor), ``||(K' + λ)^-1 - (K + λ)^-1||_2 <= ||K' - K||_2 / λ *
||(K + λ)^-1||_2`` (both PSD), and the tolerance makes ``||K' - K||`` small: the preconditioned gradients stay within
a few per cent of the exact ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.kronecker.methods.warm import WarmRefresher, WarmStart, preconditioning_error

from helpers import single_thread  # noqa: F401  (autouse fixture)


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return x.T @ x / (4 * d)


def test_the_error_measure_of_a_2x2_factor():
    b = torch.tensor([[4.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    floor = 1e-3
    want = 0.3 / ((4 + floor * 4) * (1 + floor * 4)) ** 0.5
    assert preconditioning_error(b, floor) == pytest.approx(want, rel=1e-9)
    assert preconditioning_error(torch.diag(torch.tensor([1.0, 2.0])), floor) == 0.0
    assert preconditioning_error(torch.zeros(3, 3), floor) == 0.0


def _metric_error(m: torch.Tensor, d: torch.Tensor, q: torch.Tensor, delta: float) -> float:
    """``||(D+δ)^½ [Q(D+δ)^-1 Q^T - (M+δ)^-1] Q (D+δ)^½||_2``: the error of the kept decomposition's damped
    inverse, in the metric of the damped diagonal."""
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    diff = torch.diag(1 / (d + delta)) - q.T @ torch.linalg.inv(m + delta * eye) @ q
    root = (d + delta).sqrt()
    return float(torch.linalg.matrix_norm(root[:, None] * diff * root[None, :], ord=2))


def test_an_unchanged_factor_keeps_its_basis_and_a_perturbed_one_is_corrected_within_the_bound():
    """Kept or corrected, the damped inverse is within err / (1 - err) of the exact one in the metric of the damped
    diagonal (S (I - (I + SES)^-1) S^-1 ... with ||SES|| = err), and err <= tol."""
    m = _spd(30, 0)
    d, q = torch.linalg.eigh(m)
    config = WarmStart(tol=0.05, floor=1e-3, max_iters=3)
    warm = WarmRefresher(config)
    got = warm.refine(m, q)
    assert got is not None and got[1] is q and warm.counts["kept"] == 1
    torch.testing.assert_close(got[0], d.clamp(min=0), rtol=1e-10, atol=1e-12)
    nudged = m + 0.05 * _spd(30, 1)  # the factor changed: the old basis is off by more than tol
    b = q.T @ nudged @ q
    assert preconditioning_error(b, config.floor) > config.tol
    got = warm.refine(nudged, q)
    assert got is not None and warm.counts["corrected"] == 1
    dn, qn = got
    torch.testing.assert_close(qn.T @ qn, torch.eye(30, dtype=torch.float64), rtol=0, atol=1e-12)
    bn = qn.T @ nudged @ qn
    err = preconditioning_error(bn, config.floor)
    assert err <= config.tol
    torch.testing.assert_close(dn, torch.diagonal(bn).clamp(min=0))
    delta = config.floor * float(dn.max())
    assert _metric_error(nudged, dn, qn, delta) <= err / (1 - err) * 1.01


def test_a_factor_that_jumped_falls_back_to_an_exact_eigh():
    model = nn.Linear(6, 4).double()
    pre = kfac.KFACPreconditioner(model, warm_start=WarmStart(tol=1e-3, max_iters=1), factor_dtype=torch.float64,
                                  kl_clip=None, factor_decay=0.5, damping=0.1)
    x = torch.randn(32, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    pre.step()  # first refresh: exact
    entry = pre.store[""]
    torch.testing.assert_close(entry.dA, torch.linalg.eigvalsh(entry.A).clamp(min=0))
    counts = pre.method.warm.counts
    assert sum(counts.values()) == 0
    entry.A = _spd(7, 3)  # the factor jumps: the old basis is far from diagonalising it
    pre.refresh()
    assert counts["fallback"] >= 1
    d, q = torch.linalg.eigh(entry.A)
    torch.testing.assert_close(entry.dA, d.clamp(min=0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((entry.QA.T @ q).abs(), torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-8)
    # backoff: the factor that fell back goes straight to eigh at its next refresh, then is tried again
    entry.A = _spd(7, 4)
    pre.refresh()
    assert counts["skipped"] == 1
    torch.testing.assert_close(entry.dA, torch.linalg.eigvalsh(entry.A).clamp(min=0), rtol=1e-10, atol=1e-12)
    pre.refresh()  # unchanged factor, tried again: the basis is kept
    assert counts["skipped"] == 1 and counts["kept"] >= 1


def _dense_precondition(entry, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """(A (x) G + λ I)^-1 vec(V), column-major vec: (A (x) G) vec(V) = vec(G V A)."""
    k = torch.kron(entry.A, entry.G)
    v = grad.T.reshape(-1)
    return torch.linalg.solve(k + damping * torch.eye(k.shape[0], dtype=k.dtype), v).reshape(grad.shape[1], -1).T


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_preconditioned_gradients_on_a_training_trajectory_stay_close_to_the_exact_ones(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    damping = 1e-2
    pre = kfac.KFACPreconditioner(model, method=method, warm_start=True, factor_dtype=torch.float64, kl_clip=None,
                                  damping=damping, factor_decay=0.9, inv_update_steps=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 8, dtype=torch.float64), torch.randint(0, 3, (256,))
    worst = 0.0
    for step in range(40):
        i = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(step))
        sgd.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        raw = {n: pre.adapters[n].grad_matrix().clone() for n in pre.layers}
        pre.step()
        if method == "eigen" and step % 2 == 0 and step > 0:  # a refresh step: compare with the dense solve
            for n in pre.layers:
                e = pre.store[n]
                want = _dense_precondition(e, raw[n], damping)
                got = pre.adapters[n].grad_matrix()
                worst = max(worst, float((got - want).norm() / want.norm()))
        sgd.step()
    counts = pre.method.warm.counts
    assert counts["kept"] + counts["corrected"] > 0  # the warm start was used, not only eigh
    assert worst < 0.05, worst


def test_warm_start_needs_an_eigenbasis_and_valid_settings():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="warm_start needs method='eigen' or 'ekfac'"):
        kfac.KFACPreconditioner(model, method="inverse", warm_start=True)
    with pytest.raises(ValueError, match="tol"):
        WarmStart(tol=0.0)
    with pytest.raises(ValueError, match="floor"):
        WarmStart(floor=1.0)
    with pytest.raises(ValueError, match="max_iters"):
        WarmStart(max_iters=-1)
    with pytest.raises(TypeError, match="warm_start"):
        kfac.KFACPreconditioner(model, warm_start="yes")


def test_the_planner_prices_warm_refreshes_below_a_full_decomposition():
    from kfac.kronecker.methods import WARM_REFRESH_FRACTION
    from kfac.planner import CostModel

    cm = CostModel.default()
    warm = CostModel(refresh_fraction=WARM_REFRESH_FRACTION)
    assert warm.decomposition_seconds(100) == pytest.approx(WARM_REFRESH_FRACTION * cm.decomposition_seconds(100))
    assert warm.decomposition_seconds(100, method="inverse") == cm.decomposition_seconds(100, method="inverse")
    with pytest.raises(ValueError, match="refresh_fraction"):
        CostModel(refresh_fraction=0.0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    plain = kfac.KFACPreconditioner(model)
    assert plain.executor.plan_kwargs["cost_model"].refresh_fraction == 1.0
    plain.remove()
    pre = kfac.KFACPreconditioner(model, warm_start=True)
    assert pre.executor.plan_kwargs["cost_model"].refresh_fraction == WARM_REFRESH_FRACTION
