"""Adaptive K-FAC (kfac.KFAC(..., adaptive=True)) against dense float64 math: each update is the minimiser of the
damped quadratic model built from the exact GGN (torch.func) on span{Δ, δ₀}; Δ is the K-FAC direction at the current
damping; the damping follows the Levenberg-Marquardt rule; resume is bit-exact; misuse is a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.adaptive.controller import AdaptiveConfig
from kfac.adaptive.quadratic import levenberg_marquardt

from helpers import dense_ggn, single_thread  # noqa: F401  (autouse fixture)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _opt(model, inv_update_steps=10, fisher="mc", accumulation_steps=1, grad_scaler=None, **config):
    return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=AdaptiveConfig(**config),
                     factor_dtype=torch.float64, inv_update_steps=inv_update_steps, fisher=fisher,
                     accumulation_steps=accumulation_steps, grad_scaler=grad_scaler)


def _dense_ggn(model, x, y):
    return dense_ggn(model, x, lambda z: F.cross_entropy(z, y))


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def test_each_update_minimises_the_exact_damped_quadratic_model_on_span_of_direction_previous_update_and_gradient():
    model = _model()
    opt = _opt(model, adapt_every=100, initial_damping=1.0)  # damping fixed over these steps (none undone)
    ctl = opt.adaptive
    previous = None
    for step in range(3):
        x, y = _batch(step)
        ggn, names = _dense_ggn(model, x, y)
        g = _flat(dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))),
                  names)
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        damping = ctl.damping
        opt.step(lambda: F.cross_entropy(model(x), y))
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        delta = _flat(ctl.direction, names)
        dirs = ([delta] if previous is None else [delta, previous]) + [-g]  # AdaptiveConfig.gradient_direction
        a = torch.stack([torch.stack([u @ ggn @ v + damping * u @ v for v in dirs]) for u in dirs])
        c = -torch.linalg.solve(a, torch.stack([g @ u for u in dirs]))
        want = sum(ci * u for ci, u in zip(c, dirs))
        assert ctl.undone == 0
        torch.testing.assert_close(after - before, want, rtol=1e-8, atol=1e-12)
        assert ctl.last["alpha"] == pytest.approx(float(c[0]), rel=1e-8)
        if previous is not None:
            assert ctl.last["mu"] == pytest.approx(float(c[1]), rel=1e-8)
        assert ctl.last["beta"] == pytest.approx(float(c[-1]), rel=1e-8)
        previous = after - before


def test_direction_is_the_kfac_direction_at_the_relative_factor_damping():
    """``Δ = -(A ⊗ G + γ mean(eig) I)^{-1} g`` per layer, ``γ`` relative to the layer's mean eigenvalue."""
    model = _model()
    opt = _opt(model, factor_damping=0.05)
    x, y = _batch(0)
    g = dict(zip([n for n, _ in model.named_parameters()],
                 torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
    opt.step(lambda: F.cross_entropy(model(x), y))
    e = opt.store["2"]
    raw = torch.cat([g["2.weight"], g["2.bias"][:, None]], 1)
    eig = torch.outer(e.dG, e.dA)
    assert float(eig.mean()) == pytest.approx(float(torch.trace(e.A) * torch.trace(e.G)) / eig.numel(), rel=1e-10)
    want = -(e.QG @ ((e.QG.T @ raw @ e.QA) / (eig + 0.05 * eig.mean())) @ e.QA.T)
    got = torch.cat([opt.adaptive.direction["2.weight"], opt.adaptive.direction["2.bias"][:, None]], 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_damping_follows_the_levenberg_marquardt_rule_and_training_makes_progress():
    model = _model()
    opt = _opt(model, adapt_every=2)
    ctl = opt.adaptive
    x, y = _batch(0)
    first = float(F.cross_entropy(model(x), y))
    for step in range(8):
        before, undone = ctl.damping, ctl.undone
        opt.step(lambda: F.cross_entropy(model(x), y))
        if ctl.undone > undone:  # a step that raised the loss: taken back, λ multiplied at once
            assert ctl.damping == pytest.approx(before * 4)
        elif ctl.steps % 2 == 0:
            assert ctl.damping == pytest.approx(levenberg_marquardt(before, ctl.last["rho"], omega=(19 / 20) ** 2))
        else:
            assert ctl.damping == before
    assert float(F.cross_entropy(model(x), y)) < 0.7 * first  # a fixed batch: the loss must go down steadily
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_is_bit_exact():
    def run(model, opt, steps):
        for step in steps:
            x, y = _batch(step)
            opt.step(lambda: F.cross_entropy(model(x), y))

    # refreshes on the resumed steps use factors from labels sampled after the checkpoint (Monte-Carlo Fisher)
    ref = _model()
    ref_opt = _opt(ref, adapt_every=2, inv_update_steps=2)
    run(ref, ref_opt, range(7))
    model = _model()
    opt = _opt(model, adapt_every=2, inv_update_steps=2)
    run(model, opt, range(4))
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    opt.preconditioner.remove()
    model2 = _model(seed=5)
    opt2 = _opt(model2, adapt_every=2, inv_update_steps=2)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    run(model2, opt2, range(4, 7))
    for p, q in zip(model2.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt2.adaptive.damping == ref_opt.adaptive.damping


def test_misuse_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="without momentum"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), adaptive=True)
    with pytest.raises(ValueError, match="without momentum"):
        kfac.KFAC(model, torch.optim.Adam(model.parameters()), adaptive=True)
    with pytest.raises(ValueError, match="sets"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, damping=1e-3)
    with pytest.raises(ValueError, match="inverse"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, method="inverse")
    with pytest.raises(ValueError, match="relative"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, relative_damping=False)
    with pytest.raises(ValueError, match="adaptive loss"):
        AdaptiveConfig(loss="hinge")
    opt = _opt(model)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    x, y = _batch(0)
    with pytest.raises(TypeError, match="scalar tensor"):
        opt.step(lambda: float(F.cross_entropy(model(x), y)))
    with pytest.raises(ValueError, match="one per micro-batch"):
        opt.step([lambda: F.cross_entropy(model(x), y)] * 2)
    with pytest.raises(RuntimeError, match="no forward pass"):
        opt.step(lambda: model[0].weight.sum())
    other = _model()
    with pytest.raises(ValueError, match="none of the supported layers"):
        kfac.KFAC(other, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True)
    acc = kfac.KFAC(other, torch.optim.SGD(other.parameters(), lr=1.0), adaptive=True, accumulation_steps=2)
    with pytest.raises(ValueError, match="2 closure"):  # (and the failed construction left no hooks behind)
        acc.step(lambda: F.cross_entropy(other(x), y))


def test_a_non_finite_update_is_never_applied():
    model = _model()
    opt = _opt(model)
    x, y = _batch(0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: F.cross_entropy(model(x), y) * float("nan"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.preconditioner.skipped_steps == 1



def test_a_step_after_which_the_batch_loss_rose_is_undone():
    """On a step where ρ is measured, a loss increase takes the step back exactly, drops the momentum direction
    and raises λ (here the closure reports a higher loss when evaluated after the update)."""
    model = _model()
    opt = _opt(model, adapt_every=1, initial_damping=1.0)
    x, y = _batch(0)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.adaptive.undone == 0
    before = [p.detach().clone() for p in model.parameters()]
    damping = opt.adaptive.damping
    opt.step(lambda: F.cross_entropy(model(x), y) + (0.0 if torch.is_grad_enabled() else 1.0))
    assert opt.adaptive.undone == 1 and opt.adaptive.last["rho"] < 0
    assert opt.adaptive.previous is None
    assert opt.adaptive.damping == pytest.approx(damping * 4)  # AdaptiveConfig.undo_factor
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)  # bit for bit
    assert opt.state_dict()["kfac_adaptive"]["undone"] == 1


def _run(opt, model, steps, micro=1):
    for step in range(steps):
        x, y = _batch(step)
        if micro == 1:
            opt.step(lambda: F.cross_entropy(model(x), y))
        else:
            opt.step([lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb) for xb, yb in zip(x.chunk(micro),
                                                                                           y.chunk(micro))])


def test_accumulated_micro_batches_equal_one_full_batch():
    """Two equal micro-batches (two closures per step, ``accumulation_steps=2``) give the full batch's update:
    the same gradient, factors and quadratic model (the curvature is the micro-batches' mean)."""
    ref = _model()
    ref_opt = _opt(ref, adapt_every=2, inv_update_steps=2, fisher="empirical")
    _run(ref_opt, ref, 6)
    model = _model()
    opt = _opt(model, adapt_every=2, inv_update_steps=2, fisher="empirical", accumulation_steps=2)
    _run(opt, model, 6, micro=2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert opt.adaptive.damping == pytest.approx(ref_opt.adaptive.damping, rel=1e-12)
    assert opt.adaptive.last["alpha"] == pytest.approx(ref_opt.adaptive.last["alpha"], rel=1e-8)


def _scaler(**kwargs):
    try:
        return torch.amp.GradScaler("cpu", **kwargs)
    except (AttributeError, TypeError, RuntimeError) as exc:  # torch without a CPU GradScaler
        pytest.skip(f"no CPU GradScaler in this torch: {exc}")


def test_grad_scaler_gives_the_unscaled_run_and_skips_overflowing_steps():
    """A power-of-two loss scale is exact: the run equals the one without a scaler; an overflow skips the step
    (parameters unchanged) and halves the scale."""
    ref = _model()
    ref_opt = _opt(ref, adapt_every=2, inv_update_steps=2, fisher="empirical")
    _run(ref_opt, ref, 5)
    model = _model()
    scaler = _scaler(init_scale=2.0 ** 10, growth_interval=1000)
    opt = _opt(model, adapt_every=2, inv_update_steps=2, fisher="empirical", grad_scaler=scaler)
    _run(opt, model, 5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(9)
    opt.step(lambda: F.cross_entropy(model(x), y) * 1e308)  # scaled by 2^10: overflows to inf
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0 ** 9
    _run(opt, model, 1)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_ekfac_adaptive_direction_uses_the_corrected_eigenvalues():
    """``kfac.EKFAC(..., adaptive=True)``: ``Δ = -B (Λ + γ mean(Λ))^{-1} B^T g`` with ``B = QA ⊗ QG`` and ``Λ`` the
    eigenvalues corrected from per-example gradients (dense float64 check after a correction step)."""
    model = _model()
    opt = kfac.EKFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=AdaptiveConfig(factor_damping=0.05),
                     factor_dtype=torch.float64, fisher="empirical")
    for step in range(2):  # step 0 refreshes the eigenbases, step 1 corrects the eigenvalues
        x, y = _batch(step)
        g = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
        opt.step(lambda: F.cross_entropy(model(x), y))
    e = opt.store["2"]
    lam = e.extras["Lambda"]
    assert not torch.allclose(lam, torch.outer(e.dG, e.dA))  # corrected, not the K-FAC eigenvalues
    basis = torch.kron(e.QA, e.QG)
    raw = torch.cat([g["2.weight"], g["2.bias"][:, None]], 1).T.reshape(-1)  # column-major vec
    want = -(basis @ ((basis.T @ raw) / (lam.T.reshape(-1) + 0.05 * lam.mean())))
    got = torch.cat([opt.adaptive.direction["2.weight"], opt.adaptive.direction["2.bias"][:, None]], 1)
    torch.testing.assert_close(got.T.reshape(-1), want, rtol=1e-9, atol=1e-12)
