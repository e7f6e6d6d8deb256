"""``nn.MultiheadAttention``: its in-projection (q, k, v as one block with a shared A) and ``out_proj`` are
preconditioned although its forward applies them functionally. Exact case (one example, sequence length 1,
float64): ``A ⊗ G`` is the exact empirical Fisher block; per-example rows equal per-example gradients from
``torch.func``; batch-first and sequence-first layouts give the same factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
from kfac.influence.gradients import capture, example_matrices

from helpers import single_thread  # noqa: F401  (autouse fixture)


class Attn(nn.Module):
    def __init__(self, batch_first: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _matrix(weight, bias):
    return weight if bias is None else torch.cat([weight, bias[:, None]], 1)


def test_attention_projections_are_tracked_not_skipped():
    model = Attn()
    pre = kfac.KFACPreconditioner(model)
    assert pre.layers == ["attn", "attn.out_proj", "head"] and not pre.skipped
    other = nn.MultiheadAttention(6, 2, kdim=4, vdim=4)
    with pytest.warns(UserWarning, match="not preconditioned"):
        pre = kfac.KFACPreconditioner(nn.Sequential(other))
    assert pre.skipped[0][0] == "0" and "kdim/vdim" in pre.skipped[0][1]


@pytest.mark.parametrize("bias", [True, False])
def test_single_example_of_length_one_gives_the_exact_empirical_fisher_block(bias):
    torch.manual_seed(0)
    model = Attn(bias=bias).double()
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.1)
    x, y = torch.randn(1, 1, 6, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    raw = {"attn": _matrix(model.attn.in_proj_weight.grad, model.attn.in_proj_bias.grad if bias else None).clone(),
           "attn.out_proj": _matrix(model.attn.out_proj.weight.grad,
                                    model.attn.out_proj.bias.grad if bias else None).clone()}
    pre.step()
    got = {"attn": _matrix(model.attn.in_proj_weight.grad, model.attn.in_proj_bias.grad if bias else None),
           "attn.out_proj": _matrix(model.attn.out_proj.weight.grad, model.attn.out_proj.bias.grad if bias else None)}
    for name, v in raw.items():
        e = pre.store[name]
        vec = v.T.reshape(-1)                                  # column-major: (A ⊗ G) vec(V) = vec(G V A)
        fisher = torch.outer(vec, vec)
        torch.testing.assert_close(torch.kron(e.A, e.G), fisher, rtol=1e-10, atol=1e-14)
        want = torch.linalg.solve(fisher + 0.1 * torch.eye(len(vec), dtype=torch.float64), vec)
        torch.testing.assert_close(got[name].T.reshape(-1), want, rtol=1e-8, atol=1e-11)


def test_batch_first_and_sequence_first_give_the_same_factors():
    torch.manual_seed(0)
    a, b = Attn(batch_first=True).double(), Attn(batch_first=False).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
    stores = []
    for model, xi, yi in ((a, x, y), (b, x.transpose(0, 1), y.transpose(0, 1))):
        pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
        F.mse_loss(model(xi), yi).backward()
        pre.step()
        stores.append(pre.store)
    for name in ("attn", "attn.out_proj"):
        torch.testing.assert_close(stores[0][name].A, stores[1][name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stores[0][name].G, stores[1][name].G, rtol=1e-12, atol=1e-14)
    rows = torch.cat([x.reshape(-1, 6), torch.ones(15, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(stores[0]["attn"].A, rows.T @ rows / 15, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batch_first", [True, False])
def test_per_example_rows_give_per_example_gradients(batch_first):
    """The (L, N) regrouping of the attention's rows: sum_t g a^T per example equals torch.func's per-example
    gradient of in_proj and out_proj (what EK-FAC corrections and influence use)."""
    torch.manual_seed(0)
    model = Attn(batch_first=batch_first).double()
    pre = kfac.KFACPreconditioner(model, hooks=False)
    x, y = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    with capture(pre.adapters, torch.float64) as cap:
        F.mse_loss(model(x), y, reduction="sum").backward()
    rows = cap.rows
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        xi, yi = (xi[None], yi[None]) if batch_first else (xi[:, None], yi[:, None])
        return F.mse_loss(functional_call(model, p, (xi,)), yi, reduction="sum")

    per = vmap(grad(loss), in_dims=(None, 0 if batch_first else 1, 0 if batch_first else 1))(params, x, y)
    for name, (w, b) in {"attn": ("attn.in_proj_weight", "attn.in_proj_bias"),
                         "attn.out_proj": ("attn.out_proj.weight", "attn.out_proj.bias")}.items():
        want = torch.cat([per[w], per[b][:, :, None]], 2)
        torch.testing.assert_close(example_matrices(*rows[name]), want, rtol=1e-9, atol=1e-12)


def test_training_a_transformer_encoder_with_kfac_reduces_the_loss():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False), nn.Linear(16, 4))
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), inv_update_steps=5)
    assert "0.layers.0.self_attn" in opt.preconditioner.layers
    assert "0.layers.0.self_attn.out_proj" in opt.preconditioner.layers
    x, y = torch.randn(32, 6, 16), torch.randint(0, 4, (32,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).mean(1), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert not opt.preconditioner.unused_layers


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_capture_leaves_the_attention_output_unchanged(need_weights, masks):
    """Taking the projections out of F.multi_head_attention_forward (identity weights in their place) gives the
    same outputs and attention weights, with masks and need_weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    kw: dict = {"need_weights": need_weights}
    if masks == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    elif masks == "causal":
        kw.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64), is_causal=True)
    out, weights = mha(x, x, x, **kw)
    pre = kfac.KFACPreconditioner(mha)
    got, got_weights = mha(x, x, x, **kw)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-14)
    if need_weights:
        torch.testing.assert_close(got_weights, weights, rtol=1e-12, atol=1e-14)
    got.sum().backward()
    pre.step()  # both projections collected statistics
    assert not pre.unused_layers
