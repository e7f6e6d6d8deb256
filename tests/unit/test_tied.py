"""Tied weights (an embedding whose matrix the output layer reuses): one Kronecker block with both uses' rows,
each row pair balanced (see kfac.modules.tied). The factors equal the documented formula computed from rows
captured with autograd (float64), do not depend on which module is registered first, are invariant to a loss scale
(one power of it per factor), and the block preconditions the shared weight's full gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac

V, D = 11, 5


class TiedLM(nn.Module):
    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        emb, mid, head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V, bias=False)
        if head_first:  # registration order decides which module named_modules() meets first
            self.head, self.emb = head, emb
        else:
            self.emb, self.head = emb, head
        self.mid = mid
        self.head.weight = self.emb.weight

    def forward(self, ids):
        self.e = self.emb(ids)
        self.h = torch.tanh(self.mid(self.e))
        if self.e.requires_grad:
            self.e.retain_grad()
            self.h.retain_grad()
        self.logits = self.head(self.h)
        self.logits.retain_grad()
        return self.logits


def _reference(model: TiedLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced, pooled factors written out row by row from the captured rows of both uses."""
    A, G, n = torch.zeros(V, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64), 0
    rows = [(F.one_hot(t, V).double(), g) for t, g in zip(ids.reshape(-1), model.e.grad.reshape(-1, D))]
    rows += list(zip(model.logits.grad.reshape(-1, V), model.h.detach().reshape(-1, D)))
    for a, g in rows:  # embedding: (one-hot token, dL/de); head: (dL/dlogits, its input h)
        s2 = g.norm() / a.norm()
        A += s2 * a ** 2
        G += torch.outer(g, g) / s2
        n += 1
    return A / n, G / n


def _fit(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> kfac.KFACPreconditioner:
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.1)
    (scale * F.cross_entropy(model(ids).reshape(-1, V), targets.reshape(-1))).backward()
    if scale != 1.0:
        for p in model.parameters():
            p.grad /= scale
    pre.step()
    return pre


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)


@pytest.mark.parametrize("head_first", [False, True])
def test_factors_are_the_balanced_rows_of_both_uses_whatever_the_registration_order(head_first):
    model = TiedLM(head_first).double()
    ids, targets = _data()
    pre = _fit(model, ids, targets)
    assert sorted(pre.layers) == ["emb", "mid"] and "tied to 'emb'" in dict(pre.skipped)["head"]
    want_a, want_g = _reference(model, ids)
    torch.testing.assert_close(pre.store["emb"].A, want_a, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(pre.store["emb"].G, want_g, rtol=1e-10, atol=1e-15)
    other = _fit(TiedLM(not head_first).double(), ids, targets)
    torch.testing.assert_close(other.store["emb"].A, pre.store["emb"].A, rtol=1e-12, atol=0)
    torch.testing.assert_close(other.store["emb"].G, pre.store["emb"].G, rtol=1e-12, atol=0)


def test_a_loss_scale_enters_each_factor_once_and_preconditions_the_full_shared_gradient():
    """Scaling the loss by c scales A and G by c each (so the (1, 1) powers are right); the preconditioned
    gradient of the shared matrix is the explicit damped Kronecker solve of its *whole* gradient (both uses)."""
    ids, targets = _data()
    base = _fit(TiedLM().double(), ids, targets)
    scaled = _fit(TiedLM().double(), ids, targets, scale=8.0)
    torch.testing.assert_close(scaled.store["emb"].A, 8 * base.store["emb"].A, rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled.store["emb"].G, 8 * base.store["emb"].G, rtol=1e-12, atol=0)

    model = TiedLM().double()
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.1)
    F.cross_entropy(model(ids).reshape(-1, V), targets.reshape(-1)).backward()
    full = model.emb.weight.grad.T.clone()  # (D, V): the embedding's layout, both uses' gradient
    pre.step()
    A, G = pre.store["emb"].A, pre.store["emb"].G
    dense = torch.kron(G, torch.diag(A))  # row-major vec of the (D, V) matrix: G on rows, A on columns
    eig = torch.linalg.eigvalsh(dense)
    assert eig.min() > -1e-12  # positive semi-definite
    qa, qg = torch.ones(V, dtype=torch.float64), torch.linalg.eigh(G)
    lam = torch.outer(qg.eigenvalues, A) + 0.1  # eigen method: (dG ⊗ dA + damping)^-1 in the eigenbases
    want = qg.eigenvectors @ ((qg.eigenvectors.T @ full * qa) / lam)
    torch.testing.assert_close(model.emb.weight.grad.T, want, rtol=1e-9, atol=1e-12)


def test_training_a_tied_language_model_lowers_the_loss_without_warnings():
    import warnings

    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    ids = torch.randint(0, V, (16, 7), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]
