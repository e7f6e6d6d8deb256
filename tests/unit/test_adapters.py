"""Layer types beyond nn.Linear / nn.Conv2d: nn.Conv1d (the 2-d convolution over height 1, checked against an
explicit unfold reference), Hugging Face's transposed-weight ``Conv1D`` (equal to nn.Linear with the weight
transposed) and the public adapter registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac.modules import LinearAdapter, adapter_for

from helpers import single_thread  # noqa: F401  (autouse fixture)


def _step(model, x, y, **kw):
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, **kw)
    F.mse_loss(model(x), y).backward()
    pre.step()
    return pre


@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2, padding=1), dict(dilation=2, bias=False),
                                    dict(padding="same"), dict(padding=2, padding_mode="reflect")])
def test_conv1d_factors_equal_explicit_unfold_reference_and_conv2d_of_height_one(kwargs):
    torch.manual_seed(0)
    c1 = nn.Conv1d(3, 4, 3, **kwargs).double()
    c2 = nn.Conv2d(3, 4, (1, 3), **{k: ((0, v) if k == "padding" and isinstance(v, int) else (1, v)
                                        if k in ("stride", "dilation") else v) for k, v in kwargs.items()}).double()
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        if c1.bias is not None:
            c2.bias.copy_(c1.bias)
    x = torch.randn(5, 3, 11, dtype=torch.float64)
    y = torch.randn_like(c1(x))
    p1 = _step(c1, x, y)
    p2 = _step(c2, x.unsqueeze(2), y.unsqueeze(2))
    torch.testing.assert_close(p1.store[""].A, p2.store[""].A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p1.store[""].G, p2.store[""].G, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c1.weight.grad, c2.weight.grad.squeeze(2), rtol=1e-12, atol=1e-14)
    # explicit reference: padded input, sliding windows, rows / S, normalised by N*S rows
    k, s, d = 3, kwargs.get("stride", 1), kwargs.get("dilation", 1)
    pad = kwargs.get("padding", 0)
    if pad == "same":
        xp = F.pad(x, (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2))
    else:
        xp = F.pad(x, (pad, pad), mode="constant" if kwargs.get("padding_mode", "zeros") == "zeros"
                   else kwargs["padding_mode"])
    span = d * (k - 1) + 1
    windows = xp.unfold(-1, span, s)[..., ::d]                      # (N, C, S, k)
    n, sp = x.shape[0], windows.shape[2]
    rows = windows.permute(0, 2, 1, 3).reshape(n * sp, -1)         # channel-major patches, like F.unfold
    if c1.bias is not None:
        rows = torch.cat([rows, torch.ones(n * sp, 1, dtype=rows.dtype)], 1)
    torch.testing.assert_close(p1.store[""].A, (rows / sp).T @ (rows / sp) / (n * sp), rtol=1e-10, atol=1e-13)


def test_conv1d_unbatched_input_equals_a_batch_of_one():
    conv = nn.Conv1d(2, 3, 3)
    adapter, _ = adapter_for(conv)
    x = torch.randn(2, 9)
    torch.testing.assert_close(adapter.a_rows(x), adapter.a_rows(x[None]))


class Conv1D(nn.Module):
    """A stand-in with the structure of Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ W + b``, ``W`` is
    ``(nx, nf)``; the real class is tested too when ``transformers`` is installed."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


def _conv1d_classes():
    classes = [Conv1D]
    try:
        from transformers.pytorch_utils import Conv1D as HFConv1D
        classes.append(HFConv1D)
    except ImportError:
        pass
    return classes


@pytest.mark.parametrize("cls", _conv1d_classes(), ids=lambda c: c.__module__)
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_transposed_linear_equals_linear_with_the_weight_transposed(cls, method):
    torch.manual_seed(0)
    conv = nn.Sequential(cls(5, 4), nn.Tanh(), cls(3, 5)).double()
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for c, m in ((conv[0], lin[0]), (conv[2], lin[2])):
            m.weight.copy_(c.weight.T)
            m.bias.copy_(c.bias)
    x, y = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    pc, pl = _step(conv, x, y, method=method), _step(lin, x, y, method=method)
    assert pc.layers == ["0", "2"] and not pc.skipped
    for name in ("0", "2"):
        torch.testing.assert_close(pc.store[name].A, pl.store[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pc.store[name].G, pl.store[name].G, rtol=1e-12, atol=1e-14)
    for c, m in ((conv[0], lin[0]), (conv[2], lin[2])):
        torch.testing.assert_close(c.weight.grad, m.weight.grad.T, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(c.bias.grad, m.bias.grad, rtol=1e-10, atol=1e-13)


def test_register_adapter_teaches_kfac_a_new_layer_type_and_can_be_removed():
    class Scaled(nn.Module):  # a third party's linear layer with a fixed output scale
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.bias = None

        def forward(self, x):
            return 2.0 * F.linear(x, self.weight)

    class ScaledAdapter(LinearAdapter):
        @property
        def a_dim(self) -> int:
            return self.weight.shape[1]

        @property
        def g_dim(self) -> int:
            return self.weight.shape[0]

        def g_rows(self, g):  # dL/d(x W^T) = 2 dL/dy
            return 2.0 * g.reshape(-1, g.shape[-1])

    model = nn.Sequential(Scaled())
    with pytest.raises(ValueError, match="no supported layers"):
        kfac.KFACPreconditioner(model)
    handle = kfac.register_adapter(Scaled, ScaledAdapter)
    try:
        pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_decay=0.0)
        assert pre.layers == ["0"]
        x = torch.randn(8, 4)
        y = model(x)
        F.mse_loss(y, torch.zeros(8, 3)).backward()
        g = model[0].weight.grad.clone()
        pre.step()
        rows = 2.0 * (2.0 * y.detach() / y.numel())  # the adapter's rows: 2 dL/dy, dL/dy = 2 y / numel
        torch.testing.assert_close(pre.store["0"].G, rows.T @ rows / 8)
        torch.testing.assert_close(pre.store["0"].A, x.T @ x / 8)
        assert not torch.equal(model[0].weight.grad, g)  # preconditioned
        pre.remove()
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="no supported layers"):
        kfac.KFACPreconditioner(model)
    with pytest.raises(TypeError, match="ModuleAdapter"):
        kfac.register_adapter(Scaled, object)
    with pytest.raises(TypeError, match="predicate"):
        kfac.register_adapter(int, ScaledAdapter)


def _grouped_reference(conv, x, g_out):
    """Dense factors of the shared-A grouped-convolution block from an explicit unfold: per-group patch rows,
    averaged over groups; G block-diagonal over groups."""
    n, groups = x.shape[0], conv.groups
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # (N, C*k*k, S)
    s = patches.shape[-1]
    per_group = patches.reshape(n, groups, -1, s)                                    # (N, G, Cg*k*k, S)
    rows = per_group.permute(0, 3, 1, 2).reshape(n * s * groups, -1)
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    a = (rows / s).T @ (rows / s) / rows.shape[0]
    grows = g_out.permute(0, 2, 3, 1).reshape(n * s, -1) / s
    g = grows.T @ grows / (n * s)
    owner = torch.arange(g.shape[0]) // (g.shape[0] // groups)
    return a, g * (owner[:, None] == owner[None, :]), per_group, grows


@pytest.mark.parametrize("shape", [(4, 4, 4), (4, 8, 2), (6, 6, 3)], ids=["depthwise", "multiplier2", "groups3"])
def test_grouped_conv_factors_and_update_equal_the_dense_shared_a_block(shape):
    c_in, c_out, groups = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups).double()
    pre = kfac.KFACPreconditioner(conv, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.05)
    assert pre.layers == [""]
    x = torch.randn(3, c_in, 5, 5, dtype=torch.float64)
    out = conv(x)
    out.retain_grad()
    (out ** 2).mean().backward()
    raw = torch.cat([conv.weight.grad.reshape(c_out, -1), conv.bias.grad[:, None]], 1).clone()
    pre.step()
    a, g, _, _ = _grouped_reference(conv, x, out.grad)
    torch.testing.assert_close(pre.store[""].A, a, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(pre.store[""].G, g, rtol=1e-10, atol=1e-13)
    dense = torch.kron(a, g) + 0.05 * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
    want = torch.linalg.solve(dense, raw.T.reshape(-1))
    got = torch.cat([conv.weight.grad.reshape(c_out, -1), conv.bias.grad[:, None]], 1)
    torch.testing.assert_close(got.T.reshape(-1), want, rtol=1e-8, atol=1e-11)


def test_grouped_conv_equals_per_group_kfac_when_every_group_sees_the_same_patches():
    """With identical input channels every group's A is the same, and the shared-A block equals K-FAC's
    block-diagonal-over-groups curvature blockdiag(A_γ ⊗ G_γ) (dense float64 solve)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, groups=3, bias=False).double()
    pre = kfac.KFACPreconditioner(conv, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.05)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64).repeat(1, 3, 1, 1)
    out = conv(x)
    out.retain_grad()
    torch.tanh(out).sum().backward()
    raw = conv.weight.grad.reshape(6, -1).clone()
    pre.step()
    _, _, per_group, grows = _grouped_reference(conv, x, out.grad)
    s = per_group.shape[-1]
    blocks, vecs = [], []
    for gamma in range(3):
        rows = per_group[:, gamma].permute(0, 2, 1).reshape(-1, 9) / s
        a_gamma = rows.T @ rows / rows.shape[0]
        gg = grows[:, 2 * gamma:2 * gamma + 2]
        blocks.append(torch.kron(a_gamma, gg.T @ gg / gg.shape[0]))
        vecs.append(raw[2 * gamma:2 * gamma + 2].T.reshape(-1))
    dense = torch.block_diag(*blocks) + 0.05 * torch.eye(sum(b.shape[0] for b in blocks), dtype=torch.float64)
    want = torch.linalg.solve(dense, torch.cat(vecs))
    got = conv.weight.grad.reshape(6, -1)
    got_vecs = torch.cat([got[2 * gamma:2 * gamma + 2].T.reshape(-1) for gamma in range(3)])
    torch.testing.assert_close(got_vecs, want, rtol=1e-8, atol=1e-11)


def test_depthwise_conv1d_is_tracked_and_ekfac_leaves_grouped_convs_out_with_a_reason():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4), nn.Conv1d(4, 2, 1))
    pre = kfac.KFACPreconditioner(model)
    assert pre.layers == ["0", "1"]
    pre.remove()
    with pytest.warns(UserWarning, match="per-example"):
        pre = kfac.KFACPreconditioner(model, method="ekfac")
    assert pre.layers == ["1"] and "per-example" in dict(pre.skipped)["0"]
