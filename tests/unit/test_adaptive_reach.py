"""Adaptive K-FAC beyond MLPs: the quadratic model of any loss of the outputs (dense float64 GGN references), the
Monte-Carlo samples of its output Hessian, transformer / recurrent / Hugging Face models, and the closure contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

import kfac
from kfac.adaptive.controller import AdaptiveConfig
from kfac.adaptive.output_loss import OutputLoss
from kfac.adaptive.quadratic import output_jvps, quadratic_model

from helpers import dense_ggn, single_thread  # noqa: F401  (autouse fixture)

V = 5
WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
LOSSES = {
    # (N, T, V) logits of a sequence model, shifted labels with ignored positions, smoothing and class weights
    "sequence": lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1), ignore_index=-100,
                                             label_smoothing=0.1, weight=WEIGHTS),
    # (N, V, T): classes at dim 1, as F.cross_entropy takes image-like outputs
    "channels": lambda z, y: F.cross_entropy(z.transpose(1, 2), y, ignore_index=-100),
    # a sum of two losses of the same outputs
    "sum": lambda z, y: F.cross_entropy(z.reshape(-1, V), y.reshape(-1).clamp_min(0))
    + 0.1 * z.square().mean(),
}


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 6)
        self.out = nn.Linear(6, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))  # (N, T, V)


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = Seq().double()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    y = torch.randint(0, V, (4, 3))
    y[0, 0] = y[2, 1] = -100
    return model, x, y


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_quadratic_model_is_the_exact_ggn_of_the_closures_own_loss(kind):
    model, x, y = _problem()
    loss_fn = LOSSES[kind]
    ggn, names = dense_ggn(model, x, lambda z: loss_fn(z, y))
    z = model(x)
    loss = loss_fn(z, y)
    of = OutputLoss(loss, [z])
    g = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)))
    gen = torch.Generator().manual_seed(0)
    directions = [{n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
                  for _ in range(2)]
    outs, products = output_jvps(model, (x,), directions)
    m = quadratic_model(of.hvp, outs, products, directions, g)
    flat = [torch.cat([d[n].reshape(-1) for n in names]) for d in directions]
    want = torch.stack([torch.stack([u @ ggn @ v for v in flat]) for u in flat])
    torch.testing.assert_close(m.curvature, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["sequence", "channels"])
def test_monte_carlo_samples_have_the_output_hessian_as_covariance(kind):
    """``E[u u^T] = H`` per row: weights, smoothing and ignored rows (``H = 0``) included; the class dimension is
    found from the loss (last, or dim 1)."""
    model, x, y = _problem(1)
    z = model(x).detach().requires_grad_()
    loss = LOSSES[kind](z if kind == "sequence" else z.transpose(1, 2).contiguous().transpose(1, 2), y)
    of = OutputLoss(loss, [z])
    h = hessian(lambda zz: LOSSES[kind](zz, y))(z.detach())          # (N, T, V, N, T, V)
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    cov = torch.zeros(4, 3, V, V, dtype=torch.float64)
    dims: dict[int, int] = {}
    for _ in range(draws // 100):
        us = torch.stack([of.sample("cross_entropy", gen, dims)[0] for _ in range(100)])  # (100, N, T, V)
        cov += torch.einsum("kntv,kntw->ntvw", us, us)
    cov /= draws
    want = torch.stack([torch.stack([h[n, t, :, n, t, :] for t in range(3)]) for n in range(4)])
    assert dims == {0: 2}
    assert torch.count_nonzero(want[0, 0]) == 0 and torch.count_nonzero(cov[0, 0]) == 0  # an ignored position
    torch.testing.assert_close(cov, want, rtol=0, atol=0.05 * float(want.abs().max()))


def test_monte_carlo_fisher_of_a_loss_that_is_not_a_cross_entropy_is_a_clear_error():
    model, x, y = _problem()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, factor_dtype=torch.float64)
    with pytest.raises(ValueError, match="not a cross-entropy"):
        opt.step(lambda: (model(x) - 1).square().mean())


def _train(model, closure, steps, **kwargs):
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, **kwargs)
    first = float(closure())
    for _ in range(steps):
        opt.step(closure)
    last = float(closure())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return first, last, opt


class LM(nn.Module):
    def __init__(self, batch_first: bool, vocab: int = 11, dim: int = 16) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, dim)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=batch_first),
                                         1)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        h = self.enc(h if self.batch_first else h.transpose(0, 1), mask=mask, is_causal=True)
        return self.head(h if self.batch_first else h.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_lm_trains_in_either_layout(batch_first):
    """Attention through SDPA (no forward-mode AD in the fused CPU kernel), dropout, shifted labels with
    ``ignore_index``: the loss falls and nothing is skipped but the loose parameters."""
    torch.manual_seed(0)
    model = LM(batch_first)
    data = torch.randint(0, 11, (8, 9))
    x, y = data[:, :-1], data[:, 1:].clone()
    y[:, :2] = -100
    first, last, opt = _train(model, lambda: F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1),
                                                             ignore_index=-100), 25)
    assert last < 0.8 * first
    assert opt.preconditioner.skipped_steps == 0


def test_lstm_and_a_frozen_layer_train():
    torch.manual_seed(0)

    class Rec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.mid, self.head = nn.Embedding(7, 8), nn.LSTM(8, 12, batch_first=True), \
                nn.Linear(12, 12), nn.Linear(12, 7)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mid(self.rnn(self.emb(t))[0])))

    model = Rec()
    model.mid.weight.requires_grad_(False)
    data = torch.randint(0, 7, (6, 6))
    first, last, opt = _train(model, lambda: F.cross_entropy(model(data[:, :-1]).reshape(-1, 7),
                                                             data[:, 1:].reshape(-1)), 10)
    assert last < 0.8 * first
    assert "mid" not in opt.kfac.layers and "head" in opt.kfac.layers


def test_hugging_face_model_output():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = (torch.arange(8)[None] * torch.randint(1, 4, (16, 1)) + torch.randint(0, 13, (16, 1))) % 13  # learnable
    first, last, opt = _train(model, lambda: model(input_ids=ids, labels=ids).loss, 30)
    assert last < 0.8 * first
    assert "transformer.h.0.attn.c_attn" in opt.kfac.layers


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def test_closure_is_called_twice_with_the_same_randomness_and_batch_norm_statistics_updated_once():
    model = _mlp(dropout=0.5)
    x, y = _data()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, factor_dtype=torch.float64)
    draws: list[float] = []

    def closure():
        draws.append(float(torch.rand(())))  # the random state each call starts from
        return F.cross_entropy(model(x), y)

    for step in range(3):
        opt.step(closure)
        assert len(draws) == 2 * (step + 1) and draws[-1] == draws[-2]
    assert len(set(draws)) == 3
    assert int(model[1].num_batches_tracked) == 3


def test_lr_multiplies_the_chosen_update_and_zero_lr_changes_nothing():
    x, y = _data()
    steps = {}
    for lr in (1.0, 0.25, 0.0):
        model = _mlp()
        before = [p.detach().clone() for p in model.parameters()]
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=lr), adaptive=AdaptiveConfig(initial_damping=1.0),
                        factor_dtype=torch.float64)
        opt.step(lambda: F.cross_entropy(model(x), y))
        assert opt.adaptive.undone == 0
        steps[lr] = [p.detach() - q for p, q in zip(model.parameters(), before)]
    for a, b, c in zip(steps[1.0], steps[0.25], steps[0.0]):
        torch.testing.assert_close(b, 0.25 * a, rtol=1e-9, atol=1e-14)
        assert torch.count_nonzero(c) == 0


def test_weight_decay_is_in_the_quadratic_model_and_an_undone_step_is_exact():
    """``(C + (λ + η) I)`` and ``g + η θ``: the first step's ``α = -(g + ηθ)^T Δ / (Δ^T C Δ + (λ + η) Δ^T Δ)``;
    a step after which the loss rose leaves every parameter bit for bit as it was, decay included."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data()
    eta = 0.1
    ggn, names = dense_ggn(model, x, lambda z: F.cross_entropy(z, y))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x), y),
                                                               list(model.parameters()))]) + eta * theta
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=eta),
                    adaptive=AdaptiveConfig(initial_damping=1.0, gradient_direction=False), factor_dtype=torch.float64)
    opt.step(lambda: F.cross_entropy(model(x), y))
    d = torch.cat([opt.adaptive.direction[n].reshape(-1) for n in names])
    alpha = -(g @ d) / (d @ ggn @ d + (1.0 + eta) * d @ d)
    assert opt.adaptive.last["alpha"] == pytest.approx(float(alpha), rel=1e-8)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: F.cross_entropy(model(x), y) + (0.0 if torch.is_grad_enabled() else 1.0))
    assert opt.adaptive.undone == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_contract_misuse_is_a_clear_error():
    model = _mlp()
    x, y = _data()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, maximize=True)
    with pytest.raises(ValueError, match="maximize"):
        kfac.KFAC(model, sgd, adaptive=True)
    groups = [{"params": model[0].parameters(), "lr": 1.0}, {"params": list(model[1].parameters())
                                                              + list(model[4].parameters()), "lr": 0.5}]
    with pytest.raises(ValueError, match="same lr"):
        kfac.KFAC(model, torch.optim.SGD(groups, lr=1.0), adaptive=True)
    with pytest.raises(ValueError, match="units='curvature'"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, units="kaisa")
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=True, factor_dtype=torch.float64)

    def lbfgs_style():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="remove loss.backward"):
        opt.step(lbfgs_style)
    batches = iter([_data(s) for s in range(4)])

    def drawing():
        xb, yb = next(batches)
        return F.cross_entropy(model(xb), yb)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="same batch"):
        opt.step(drawing)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the update was undone
    other = _mlp()
    acc = kfac.KFAC(other, torch.optim.SGD(other.parameters(), lr=1.0), adaptive=True, accumulation_steps=2)
    with pytest.raises(ValueError, match="equal size"):
        acc.step([lambda: F.cross_entropy(other(x[:10]), y[:10]), lambda: F.cross_entropy(other(x[10:]), y[10:])])
