"""The exact quadratic model of adaptive K-FAC against dense float64 math: the GGN ``J^T H J`` built from
``torch.func.jacrev`` (Jacobian of the outputs) and ``torch.func.hessian`` (of the loss in the outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from kfac.adaptive.losses import hessian_vector_product
from kfac.adaptive.quadratic import levenberg_marquardt, output_jvps, quadratic_model

LOSSES = {
    "cross_entropy": lambda z, y: F.cross_entropy(z, y),
    "mse": lambda z, y: F.mse_loss(z, y),
    "bernoulli": lambda z, y: F.binary_cross_entropy_with_logits(z, y),
}


def _problem(loss: str, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 4, (6,))
    elif loss == "mse":
        y = torch.randn(6, 4, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (6, 4)).double()
    return model, x, y


def _dense_ggn(model, x, y, loss: str):
    """``J^T H J`` over the flattened parameters (named_parameters order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def outputs(flat):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        return functional_call(model, parts, (x,))

    z = outputs(theta)
    jac = jacrev(lambda t: outputs(t).reshape(-1))(theta)                      # (N*C, P)
    h = hessian(lambda zz: LOSSES[loss](zz.reshape(z.shape), y))(z.reshape(-1))  # (N*C, N*C)
    return jac.T @ h @ jac, names, sizes, shapes, z


def _random_direction(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_output_hessian_equals_the_dense_hessian_of_the_loss(loss):
    model, x, y = _problem(loss)
    z = model(x).detach()
    h = hessian(lambda zz: LOSSES[loss](zz.reshape(z.shape), y))(z.reshape(-1))
    v = torch.randn_like(z)
    torch.testing.assert_close(hessian_vector_product(loss, z, v).reshape(-1), h @ v.reshape(-1),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_model_coefficients_equal_the_dense_ggn(loss):
    model, x, y = _problem(loss)
    ggn, names, *_ = _dense_ggn(model, x, y, loss)
    directions = [_random_direction(model, 1), _random_direction(model, 2)]
    gradient = dict(zip(names, torch.autograd.grad(LOSSES[loss](model(x), y), list(model.parameters()))))
    z, products = output_jvps(model, (x,), directions)
    m = quadratic_model(loss, z, products, directions, gradient)
    flat = [_flat(d, names) for d in directions]
    want = torch.stack([torch.stack([u @ ggn @ v for v in flat]) for u in flat])
    torch.testing.assert_close(m.curvature, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.gram, torch.stack([torch.stack([u @ v for v in flat]) for u in flat]))
    g = _flat(gradient, names)
    torch.testing.assert_close(m.linear, torch.stack([g @ v for v in flat]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z[0], model(x).detach())


@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_solve_is_the_closed_form_minimiser_and_predicts_the_model(damping):
    model, x, y = _problem("cross_entropy")
    ggn, names, *_ = _dense_ggn(model, x, y, "cross_entropy")
    directions = [_random_direction(model, 3), _random_direction(model, 4)]
    gradient = dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
    z, products = output_jvps(model, (x,), directions)
    m = quadratic_model("cross_entropy", z, products, directions, gradient)
    c = m.solve(damping)
    # closed form of the 2x2 system, from the dense GGN
    u, v, g = (_flat(directions[0], names), _flat(directions[1], names), _flat(gradient, names))
    a = torch.tensor([[u @ ggn @ u + damping * u @ u, u @ ggn @ v + damping * u @ v],
                      [v @ ggn @ u + damping * v @ u, v @ ggn @ v + damping * v @ v]], dtype=torch.float64)
    det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
    inv = torch.tensor([[a[1, 1], -a[0, 1]], [-a[1, 0], a[0, 0]]], dtype=torch.float64) / det
    want = -inv @ torch.stack([g @ u, g @ v])
    torch.testing.assert_close(c, want, rtol=1e-9, atol=1e-12)
    # M(c*) = g^T δ + ½ δ^T (G + λI) δ for δ = c0 u + c1 v, and it is the model's minimum on the span
    delta = c[0] * u + c[1] * v
    predicted = g @ delta + 0.5 * delta @ (ggn @ delta) + 0.5 * damping * delta @ delta
    torch.testing.assert_close(m.value(c, damping), predicted, rtol=1e-9, atol=1e-12)
    for e in torch.eye(2, dtype=torch.float64):
        assert m.value(c + 1e-3 * e, damping) > m.value(c, damping)


def test_one_direction_gives_the_step_size_along_it():
    model, x, y = _problem("mse")
    ggn, names, *_ = _dense_ggn(model, x, y, "mse")
    d = _random_direction(model, 5)
    gradient = dict(zip(names, torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))))
    z, products = output_jvps(model, (x,), [d])
    m = quadratic_model("mse", z, products, [d], gradient)
    u, g = _flat(d, names), _flat(gradient, names)
    torch.testing.assert_close(m.solve(0.01)[0], -(g @ u) / (u @ ggn @ u + 0.01 * u @ u), rtol=1e-10, atol=1e-12)


def test_batch_norm_running_statistics_are_not_touched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    output_jvps(model, (torch.randn(5, 3, dtype=torch.float64),), [_random_direction(model, 0)])
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_bad_input_is_a_clear_error():
    model, x, y = _problem("mse")
    with pytest.raises(ValueError, match="does not train"):
        output_jvps(model, (x,), [{"nope": torch.zeros(1)}])
    with pytest.raises(ValueError, match="loss must be one of"):
        hessian_vector_product("hinge", torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="omega"):
        levenberg_marquardt(1.0, 0.5, omega=1.5)


def test_levenberg_marquardt_follows_rho():
    omega = (19 / 20) ** 5
    damping, path = 1.0, []
    for rho in (0.9, 0.9, 0.5, 0.1, float("nan"), -3.0, 0.8):
        damping = levenberg_marquardt(damping, rho, omega=omega)
        path.append(damping)
    want = [omega, omega ** 2, omega ** 2, omega, 1.0, 1 / omega, 1.0]
    assert path == pytest.approx(want, rel=1e-12)
    assert levenberg_marquardt(1e-8, 0.99, omega=omega) == 1e-8        # clamped below
    assert levenberg_marquardt(1e8, -1.0, omega=omega) == 1e8          # and above
