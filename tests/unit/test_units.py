"""Curvature units (``units="curvature"``, adaptive K-FAC's): every block's ``A ⊗ G`` is the block of the curvature of
the back-propagated loss, in one scale for every layer type (float64, dense references).

* One example, one row per layer (a linear layer, a convolution with one output position, attention projections
  and a feed-forward block over a sequence of length 1): ``A ⊗ G`` equals the exact empirical-Fisher block
  ``vec(∇W) vec(∇W)^T`` of the mean loss; normalisation layers' diagonal ``A`` equals the exact diagonal.
* A convolution over ``S`` positions: KFC's ``Ω ⊗ Γ`` (Grosse & Martens 2016; ``Ω = Σ_t a_t a_t^T``,
  ``Γ = Σ_t g_t g_t^T / S``) with patches from ``F.unfold``, for padding, stride and groups = 1.
* A transformer block over a batch of sequences: the batch-first and sequence-first layouts give identical factors.
* In adaptive mode, each layer's direction is that layer's damped Kronecker natural gradient
  ``-(A ⊗ G + γ mean(eig) I)^{-1} g`` on a model mixing convolution, normalisation, attention and linear layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.adaptive.controller import AdaptiveConfig

from helpers import single_thread  # noqa: F401  (autouse fixture)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=2)  # 6x6 -> 3x3: S = 9 positions
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 5, 3)                       # 3x3 -> 1x1: one row per example
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(x)))
        return self.fc(torch.tanh(self.bn(self.conv2(h).flatten(1))))


class Block(nn.Module):
    """A transformer block and a head, in either layout; ``forward`` takes batch-first ``(N, T, E)``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        return self.head(h if self.batch_first else h.transpose(0, 1))


def _factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs):
    pre = kfac.KFACPreconditioner(model, units="curvature", factor_init="zero", factor_dtype=torch.float64,
                                  kl_clip=None, lr=0.1, **kwargs)
    out = model(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    grads = {name: a.grad_matrix().clone() for name, a in pre.adapters.items()}
    pre.step()
    return pre, grads


def _assert_exact(pre, grads, names):
    for name in names:
        e, v = pre.store[name], grads[name]
        if e.a_diagonal:  # normalisation layer: the exact diagonal
            torch.testing.assert_close(e.A * e.G.reshape(()), v.reshape(-1).square(), rtol=1e-10, atol=1e-16)
        else:
            exact = torch.outer(v.reshape(-1), v.reshape(-1))
            torch.testing.assert_close(torch.kron(e.G, e.A), exact, rtol=1e-10, atol=1e-16)


def test_conv_net_blocks_equal_the_exact_blocks_for_one_example():
    torch.manual_seed(0)
    model = ConvNet().double()
    model.bn.eval()  # batch norm on running statistics: examples independent
    pre, grads = _factors(model, torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.tensor([1]))
    _assert_exact(pre, grads, ["conv2", "fc", "norm"])


def test_conv_over_positions_is_kfc_omega_kron_gamma():
    torch.manual_seed(0)
    model = ConvNet().double()
    model.bn.eval()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["out"] = out

    model.conv.register_forward_hook(keep)
    pre, _ = _factors(model, x, torch.tensor([2]))
    patches = F.unfold(x, 3, padding=1, stride=2)[0].T                      # (S, 18)
    a = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=x.dtype)], 1)
    g = seen["out"].grad[0].flatten(1).T                                    # (S, 4) output gradients
    omega, gamma = a.T @ a, g.T @ g / a.shape[0]
    e = pre.store["conv"]
    torch.testing.assert_close(torch.kron(e.G, e.A), torch.kron(gamma, omega), rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_block_equals_the_exact_blocks_for_a_sequence_of_one(batch_first):
    model = Block(batch_first).double()
    pre, grads = _factors(model, torch.randn(1, 1, 8, dtype=torch.float64), torch.tensor([[2]]))
    assert {"layer.self_attn", "layer.self_attn.out_proj", "layer.linear1", "layer.norm1"} <= set(pre.layers)
    _assert_exact(pre, grads, pre.layers)


def test_transformer_layouts_give_the_same_factors():
    """Sequence-first and batch-first layouts of the same block and batch: equal factors, norm layers included
    (their per-example statistics group rows by sequence, whatever the layout)."""
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 4))
    first, _ = _factors(Block(True).double(), x, y)
    second, _ = _factors(Block(False).double(), x, y)
    assert first.layers == second.layers
    for name in first.layers:
        for f in ("A", "G"):
            torch.testing.assert_close(getattr(second.store[name], f), getattr(first.store[name], f),
                                       rtol=1e-10, atol=1e-14, msg=f"{name}.{f}")


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.conv(x)).transpose(1, 2))              # (N, T, 8)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


def test_adaptive_direction_is_each_layers_damped_kronecker_natural_gradient():
    torch.manual_seed(0)
    model = Mixed().double()
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=AdaptiveConfig(factor_damping=0.05),
                    factor_dtype=torch.float64, fisher="empirical")
    adapters = opt.kfac.adapters
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {name: a.grad_matrix().clone() for name, a in adapters.items()}
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert {"conv", "norm", "attn", "attn.out_proj", "fc"} <= set(opt.kfac.layers)
    for name, adapter in adapters.items():
        e = opt.store[name]
        block = torch.diag(e.A.reshape(-1)) * e.G.reshape(()) if e.a_diagonal else torch.kron(e.G, e.A)
        eig = torch.linalg.eigvalsh(block)
        want = -torch.linalg.solve(block + 0.05 * eig.mean() * torch.eye(block.shape[0], dtype=block.dtype),
                                   raw[name].reshape(-1))
        got = -adapter.grad_matrix().reshape(-1)  # .grad holds the preconditioned gradient, Δ = -.grad
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12, msg=name)


def test_kaisa_units_are_kept_by_the_preconditioner_and_differ_by_the_row_count():
    """``KFACPreconditioner`` keeps KAISA's units by default; curvature units' ``G`` is KAISA's times the rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    kaisa = kfac.KFACPreconditioner(model, factor_dtype=torch.float64, factor_decay=0.0)
    assert kaisa.units == "kaisa"
    F.cross_entropy(model(x), y).backward()
    kaisa.step()
    kaisa.remove()
    model.zero_grad()
    curv = kfac.KFACPreconditioner(model, factor_dtype=torch.float64, factor_decay=0.0, units="curvature")
    F.cross_entropy(model(x), y).backward()
    curv.step()
    for name in ("0", "2"):
        torch.testing.assert_close(curv.store[name].A, kaisa.store[name].A)
        torch.testing.assert_close(curv.store[name].G, 7 * kaisa.store[name].G)
