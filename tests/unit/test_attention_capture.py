"""``nn.MultiheadAttention`` with K-FAC attached: PyTorch's own forward (its fused fast path) wherever no
statistics are collected, and cross-attention in-projections preconditioned -- :class:`CrossInProjectionAdapter`
with separate Kronecker blocks ``A_q ⊗ G_q`` and ``A_kv ⊗ G_kv``, the packed adapter by K-FAC-expand over the q, k
and v rows -- checked against exact float64 per-example gradients (``torch.func``) and dense Kronecker products."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
from kfac.influence.gradients import capture, example_matrices
from kfac.modules import CrossInProjectionAdapter, InProjectionAdapter, register_adapter

from helpers import single_thread  # noqa: F401  (autouse fixture)

E = 6


class Cross(nn.Module):
    """``attn(query, memory, memory)`` (or ``attn(query, memory, value)``: ``key is not value``)."""

    def __init__(self, batch_first: bool = True, bias: bool = True, separate_value: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(E, 3)
        self.separate_value = separate_value

    def forward(self, q, m):
        v = 0.5 * m + 1.0 if self.separate_value else m
        return self.head(self.attn(q, m, v, need_weights=False)[0])


def _cross_adapter(model):
    """Registers :class:`CrossInProjectionAdapter` for ``model.attn`` (the way a user would)."""
    return register_adapter(lambda m: m is model.attn, CrossInProjectionAdapter)


def _blocks(w_grad, b_grad):
    """``(V_q, V_kv)`` in the ``(rows, E[+1])`` layout (bias last) of a ``(..., 3E, E)`` in-projection gradient."""
    mat = w_grad if b_grad is None else torch.cat([w_grad, b_grad[..., None]], -1)
    return mat[..., :E, :], mat[..., E:, :]


# -- (a) PyTorch's own forward where nothing is collected ------------------------------------------------------

def _counting(monkeypatch):
    calls = {"fused": 0, "separate": 0}
    native, functional = torch._native_multi_head_attention, F.multi_head_attention_forward

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return native(*args, **kwargs)

    def mha_forward(*args, **kwargs):
        calls["separate"] += bool(kwargs.get("use_separate_proj_weight"))  # the capture's identity weights
        return functional(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", fused)
    monkeypatch.setattr(F, "multi_head_attention_forward", mha_forward)
    return calls


class SelfAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("mode", ["eval_no_grad", "eval", "train_no_grad"])
def test_forwards_that_collect_nothing_are_pytorchs_own_with_kfac_attached(monkeypatch, mode):
    """Eval under no_grad takes PyTorch's fused kernel (torch._native_multi_head_attention) with K-FAC attached,
    and no forward that collects nothing is intercepted: outputs bitwise equal to a model without K-FAC."""
    torch.manual_seed(0)
    plain, model = SelfAttn(), SelfAttn()
    model.load_state_dict(plain.state_dict())
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "attn" in opt.preconditioner.layers and "attn.out_proj" in opt.preconditioner.layers
    x = torch.randn(4, 5, 8)
    calls = _counting(monkeypatch)
    outs = []
    for m in (plain, model):
        m.train(mode == "train_no_grad")
        with torch.set_grad_enabled(mode == "eval"):
            outs.append(m(x))
    assert calls["separate"] == 0
    assert calls["fused"] == (2 if mode == "eval_no_grad" else 0)  # the same path as the model without K-FAC
    assert torch.equal(outs[0], outs[1])


def test_training_forwards_on_steps_that_collect_nothing_are_pytorchs_own(monkeypatch):
    torch.manual_seed(0)
    model = Cross()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_update_steps=3,
                    inv_update_steps=3)
    calls = _counting(monkeypatch)
    x, m, y = torch.randn(2, 4, E), torch.randn(2, 5, E), torch.randn(2, 4, 3)
    captured = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran no forward pass" for attn (cross-attention)
        for _ in range(6):
            before = calls["separate"]
            opt.zero_grad()
            F.mse_loss(model(x, m), y).backward()
            opt.step()
            captured.append(calls["separate"] - before)
    assert [c > 0 for c in captured] == [True, False, False, True, False, False]  # factor-update steps only
    assert not opt.preconditioner.unused_layers


# -- (b) cross-attention ----------------------------------------------------------------------------------------

def _per_example(model, q, m, y, batch_first):
    params = {n: p.detach() for n, p in model.named_parameters()}
    dim = 0 if batch_first else 1

    def loss(p, qi, mi, yi):
        qi, mi, yi = (t.unsqueeze(dim) for t in (qi, mi, yi))
        return F.mse_loss(functional_call(model, p, (qi, mi)), yi, reduction="sum")

    return vmap(grad(loss), in_dims=(None, dim, dim, dim))(params, q, m, y)


@pytest.mark.parametrize("separate_value", [False, True])
@pytest.mark.parametrize("adapter", ["cross", "packed"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_per_example_rows_give_per_example_gradients(batch_first, adapter, separate_value):
    """The rows a cross-attention call reports (query rows, then key/value rows) give torch.func's per-example
    gradient of in_proj: ``blockdiag(V_q, V_kv)`` (cross adapter) or ``V`` itself (packed adapter)."""
    torch.manual_seed(0)
    model = Cross(batch_first=batch_first, separate_value=separate_value).double()
    reg = _cross_adapter(model) if adapter == "cross" else None
    try:
        pre = kfac.KFACPreconditioner(model, hooks=False)
    finally:
        if reg is not None:
            reg.remove()
    assert isinstance(pre.adapters["attn"], CrossInProjectionAdapter if adapter == "cross" else InProjectionAdapter)
    q, m, y = (torch.randn(3, n, d, dtype=torch.float64) for n, d in ((4, E), (5, E), (4, 3)))
    if not batch_first:
        q, m, y = q.transpose(0, 1), m.transpose(0, 1), y.transpose(0, 1)
    with capture(pre.adapters, torch.float64) as cap:
        F.mse_loss(model(q, m), y, reduction="sum").backward()
    got = example_matrices(*cap.rows["attn"])
    per = _per_example(model, q, m, y, batch_first)
    vq, vkv = _blocks(per["attn.in_proj_weight"], per["attn.in_proj_bias"])
    if adapter == "cross":
        h = E + 1
        want = torch.zeros(3, 3 * E, 2 * h, dtype=torch.float64)
        want[:, :E, :h], want[:, E:, h:] = vq, vkv
    else:
        want = torch.cat([vq, vkv], 1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("units", ["kaisa", "curvature"])
@pytest.mark.parametrize("separate_value", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cross_adapter_single_example_of_length_one_gives_each_blocks_exact_empirical_fisher(bias, separate_value,
                                                                                           units):
    """One example, one query and one key row: ``A_q ⊗ G_q = vec(V_q) vec(V_q)^T`` and (key is value)
    ``A_kv ⊗ G_kv = vec(V_kv) vec(V_kv)^T`` -- each block its own exact empirical Fisher, whatever the row
    scaling -- and the step solves each block with its damping, independently."""
    torch.manual_seed(0)
    model = Cross(bias=bias, separate_value=separate_value).double()
    reg = _cross_adapter(model)
    try:
        pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0,
                                      damping=0.1, units=units)
    finally:
        reg.remove()
    q, m, y = (torch.randn(1, 1, d, dtype=torch.float64) for d in (E, E, 3))
    F.mse_loss(model(q, m), y).backward()
    bgrad = model.attn.in_proj_bias.grad if bias else None
    raw = [v.clone() for v in _blocks(model.attn.in_proj_weight.grad, bgrad)]
    pre.step()
    got = _blocks(model.attn.in_proj_weight.grad, model.attn.in_proj_bias.grad if bias else None)
    e, h = pre.store["attn"], E + int(bias)
    assert e.A.shape == (2 * h, 2 * h) and e.G.shape == (3 * E, 3 * E)
    for k, (v, new, rows, cols) in enumerate(zip(raw, got, (slice(0, E), slice(E, 3 * E)),
                                                 (slice(0, h), slice(h, 2 * h)))):
        vec = v.T.reshape(-1)
        fisher = torch.kron(e.A[cols, cols], e.G[rows, rows])
        if k == 0 or not separate_value:  # key is not value: A_kv mixes the key and value rows (K-FAC-expand)
            torch.testing.assert_close(fisher, torch.outer(vec, vec), rtol=1e-10, atol=1e-13)
        want = torch.linalg.solve(fisher + 0.1 * torch.eye(len(vec), dtype=torch.float64), vec)
        torch.testing.assert_close(new.T.reshape(-1), want, rtol=1e-8, atol=1e-11)
    assert e.A[:h, h:].abs().max() == 0 and e.G[:E, E:].abs().max() == 0  # block-diagonal


def _projection_grads(model, q, m):
    """Reference rows: the inputs and the exact output gradients of the q, k and v projections (float64, by an
    explicit re-implementation with the projections as leaves)."""
    attn = model.attn
    w, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
    v_in = 0.5 * m + 1.0 if model.separate_value else m
    qs, ks, vs = (t.transpose(0, 1) for t in (q, m, v_in))  # batch_first models: (L, N, E)
    proj = [F.linear(x, w[i * E:(i + 1) * E], b[i * E:(i + 1) * E]).requires_grad_() for i, x in
            enumerate((qs, ks, vs))]
    eye = torch.eye(E, dtype=torch.float64)
    out, _ = F.multi_head_attention_forward(
        *proj, E, 2, None, None, None, None, False, 0.0, attn.out_proj.weight.detach(),
        attn.out_proj.bias.detach(), training=False, need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    loss = 0.5 * (model.head(out.transpose(0, 1)) ** 2).sum()
    return (qs, ks, vs), torch.autograd.grad(loss, proj)


@pytest.mark.parametrize("separate_value", [False, True])
def test_cross_adapter_factors_are_each_blocks_own_rows_with_its_own_row_count(separate_value):
    """``L != S``: ``A_b ⊗ G_b = (sum_b a a^T / R_b) ⊗ (sum_b g g^T / R_b)`` (KAISA's means over the block's own
    rows, as an ``nn.Linear`` would have), ``A_q`` from the query rows only and ``A_kv`` from the key (and value)
    rows only, against a dense reference."""
    torch.manual_seed(1)
    model = Cross(separate_value=separate_value).double()
    reg = _cross_adapter(model)
    try:
        pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    finally:
        reg.remove()
    q, m = torch.randn(3, 4, E, dtype=torch.float64), torch.randn(3, 7, E, dtype=torch.float64)
    (0.5 * (model(q, m) ** 2).sum()).backward()
    pre.step()
    (xq, xk, xv), (gq, gk, gv) = _projection_grads(model, q, m)

    def rows(x):
        x = x.reshape(-1, E)
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)

    a_q, g_q = rows(xq), gq.reshape(-1, E)
    if separate_value:
        a_kv = torch.cat([rows(xk), rows(xv)])
        zeros = torch.zeros_like(gk.reshape(-1, E))
        g_kv = torch.cat([torch.cat([gk.reshape(-1, E), zeros], 1), torch.cat([zeros, gv.reshape(-1, E)], 1)])
    else:
        a_kv, g_kv = rows(xk), torch.cat([gk, gv], -1).reshape(-1, 2 * E)
    e, h = pre.store["attn"], E + 1
    for a, g, rows_, cols in ((a_q, g_q, slice(0, E), slice(0, h)), (a_kv, g_kv, slice(E, 3 * E), slice(h, 2 * h))):
        want = torch.kron(a.T @ a / len(a), g.T @ g / len(g))
        torch.testing.assert_close(torch.kron(e.A[cols, cols], e.G[rows_, rows_]), want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("separate_value", [False, True])
def test_packed_adapter_preconditions_cross_attention_by_kfac_expand(separate_value):
    """The default adapter on a cross-attention call: ``A`` from the query, key (and value) rows together, ``G =
    blockdiag(G_q, G_k, G_v)``, both means over all those rows; and no "ran no forward pass" warning."""
    torch.manual_seed(2)
    model = Cross(separate_value=separate_value).double()
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    q, m = torch.randn(3, 4, E, dtype=torch.float64), torch.randn(3, 7, E, dtype=torch.float64)
    (0.5 * (model(q, m) ** 2).sum()).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.step()
    assert not pre.unused_layers
    xs, gs = _projection_grads(model, q, m)
    used = (0, 1, 2) if separate_value else (0, 1)
    a = torch.cat([xs[i].reshape(-1, E) for i in used])
    a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
    g = torch.zeros(len(a), 3 * E, dtype=torch.float64)
    start = 0
    for i in used:
        n = gs[i].reshape(-1, E).shape[0]
        cols = slice(E * i, 3 * E) if (i == 1 and not separate_value) else slice(E * i, E * (i + 1))
        block = gs[i] if cols.stop - cols.start == E else torch.cat([gs[1], gs[2]], -1)
        g[start:start + n, cols] = block.reshape(n, -1)
        start += n
    e = pre.store["attn"]
    torch.testing.assert_close(e.A, a.T @ a / len(a), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(e.G, g.T @ g / len(g), rtol=1e-10, atol=1e-13)


def test_transformer_decoder_cross_attention_gets_its_own_blocks_and_trains():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, num_layers=1)
    head = nn.Linear(16, 4)
    net = nn.ModuleDict({"dec": model, "head": head})
    opt = kfac.KFAC(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), inv_update_steps=5)
    adapters = opt.preconditioner.adapters
    assert type(adapters["dec.layers.0.self_attn"]) is InProjectionAdapter
    assert type(adapters["dec.layers.0.multihead_attn"]) is CrossInProjectionAdapter
    tgt, memory, y = torch.randn(32, 5, 16), torch.randn(32, 7, 16), torch.randint(0, 4, (32,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(head(model(tgt, memory)).mean(1), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert not opt.preconditioner.unused_layers


@pytest.mark.parametrize("units", ["kaisa", "curvature"])
@pytest.mark.parametrize("adapter", ["cross", "packed"])
def test_ekfac_corrections_of_a_cross_attention_in_projection_come_from_its_per_example_gradients(adapter, units):
    """EK-FAC on a cross-attention call: ``Lambda = sum_n (QG^T V_n QA)^2`` (curvature units; KAISA's divide by
    the ``N`` examples and their ``T = L + S`` rows) with ``V_n`` torch.func's per-example gradient of the
    batch-mean loss (``blockdiag(V_q, V_kv)`` for the cross adapter, whose eigenbases stay block-diagonal)."""
    torch.manual_seed(3)
    model = Cross().double()
    reg = _cross_adapter(model) if adapter == "cross" else None
    try:
        pre = kfac.KFACPreconditioner(model, method="ekfac", factor_decay=0.0, correction_decay=0.0, kl_clip=None,
                                      factor_dtype=torch.float64, units=units)
    finally:
        if reg is not None:
            reg.remove()
    q, m, y = (torch.randn(3, n, d, dtype=torch.float64) for n, d in ((4, E), (5, E), (4, 3)))
    for i in range(2):
        model.zero_grad()
        F.mse_loss(model(q, m), y, reduction="sum").div(3).backward()  # the batch mean of per-example sums
        pre.update()
        if i == 0:
            pre.refresh(damping=1e-3)
    per = _per_example(model, q, m, y, True)
    vq, vkv = _blocks(per["attn.in_proj_weight"] / 3, per["attn.in_proj_bias"] / 3)
    e, h = pre.store["attn"], E + 1
    if adapter == "cross":
        v = torch.zeros(3, 3 * E, 2 * h, dtype=torch.float64)
        v[:, :E, :h], v[:, E:, h:] = vq, vkv
        assert e.QA[:h, :].abs().mul(e.QA[h:, :].abs()).max() < 1e-12  # no eigenvector spans both blocks
    else:
        v = torch.cat([vq, vkv], 1)
    want = (e.QG.T @ v @ e.QA).square().sum(0)
    if units == "kaisa":
        want = want / (3 * (4 + 5))
    torch.testing.assert_close(e.extras["Lambda"], want, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("separate_value", [False, True])
@pytest.mark.parametrize("adapter", ["cross", "packed"])
def test_cross_attention_capture_leaves_outputs_unchanged_with_masks(adapter, separate_value, need_weights):
    """A captured cross-attention call (projections computed apart, identities in their place) gives PyTorch's
    outputs and attention weights, with a key padding mask and an attention mask (``S != L``)."""
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    q, k = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    v = torch.randn(3, 6, 8, dtype=torch.float64) if separate_value else k
    kw = {"need_weights": need_weights, "attn_mask": torch.randn(4, 6, dtype=torch.float64),
          "key_padding_mask": torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])}
    out, weights = mha(q, k, v, **kw)
    reg = register_adapter(lambda m: m is mha, CrossInProjectionAdapter) if adapter == "cross" else None
    try:
        pre = kfac.KFACPreconditioner(nn.ModuleDict({"attn": mha}))
    finally:
        if reg is not None:
            reg.remove()
    got, got_weights = mha(q, k, v, **kw)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-14)
    if need_weights:
        torch.testing.assert_close(got_weights, weights, rtol=1e-12, atol=1e-14)
    got.sum().backward()
    pre.step()
    assert not pre.unused_layers
