"""Normalisation layers in every layout, and norms K-FAC must not model.

* The example axis is found the way the module is used: a custom block (no ``batch_first`` of its own) with a
  sequence-first ``nn.MultiheadAttention`` beside its norm feeds it ``(T, N, E)``; the diagonal ``A`` equals
  ``Σ_n v_n² / N`` with ``v_n`` example ``n``'s share of the gradient from ``torch.func`` (float64), in both layouts,
  for PyTorch's LayerNorm / RMSNorm / GroupNorm and for other libraries' norms.
* Subclasses of PyTorch's norms are matched by type, whatever their names.
* A module that normalises over the batch is refused (named, with its reason), at construction when a probe can
  tell, else at its first statistics; and no layer's non-finite statistics switch K-FAC off for the others.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
import kfac.modules

from helpers import HandLayerNorm, LlamaStyleRMSNorm, single_thread  # noqa: F401  (autouse fixture)

E, T, N = 6, 5, 4


class ChannelGroupNorm(nn.Module):
    """GroupNorm over a sequence: ``(T, N, E)`` or ``(N, T, E)`` -> ``(N, E, T)`` for the norm, and back."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.gn, self.bf = nn.GroupNorm(2, E), batch_first

    def forward(self, x):
        x = x if self.bf else x.transpose(0, 1)
        return self.gn(x.transpose(1, 2)).transpose(1, 2) if self.bf else \
            self.gn(x.transpose(1, 2)).transpose(1, 2).transpose(0, 1)


NORMS = {
    "layernorm": lambda bf: nn.LayerNorm(E),
    "groupnorm": ChannelGroupNorm,
    "llama_rmsnorm": lambda bf: LlamaStyleRMSNorm(E),
    "hand_layernorm": lambda bf: HandLayerNorm(E),
}
if hasattr(nn, "RMSNorm"):
    NORMS["rmsnorm"] = lambda bf: nn.RMSNorm(E, eps=1e-6)


class Block(nn.Module):
    """A user's own block: attention and a norm, no ``batch_first`` attribute of its own."""

    def __init__(self, norm: nn.Module, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first)
        self.norm = norm

    def forward(self, x):
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


class Net(nn.Module):
    def __init__(self, norm: nn.Module, batch_first: bool) -> None:
        super().__init__()
        self.block, self.head, self.seq_dim = Block(norm, batch_first), nn.Linear(E, 1), 1 if batch_first else 0

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)).mean(self.seq_dim))


def _norm_params(model: Net) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith("block.norm.")}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("case", sorted(NORMS))
def test_norm_factor_is_per_example_in_both_layouts(case, batch_first):
    torch.manual_seed(0)
    model = Net(NORMS[case](batch_first), batch_first).double()
    with torch.no_grad():
        for p in _norm_params(model).values():
            p.uniform_(0.5, 1.5)
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0, damping=0.01)
    name = next(n for n in pre.layers if n.startswith("block.norm"))
    x = torch.randn(N, T, E, dtype=torch.float64)
    y = torch.randn(N, 1, dtype=torch.float64)
    xin = x if batch_first else x.transpose(0, 1).contiguous()
    F.mse_loss(model(xin), y).backward()
    pre.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def share(p, xi, yi):  # example i's share of the mean loss, the model fed in its own layout
        xi = xi[None] if batch_first else xi[:, None]
        return F.mse_loss(functional_call(model, p, (xi,)), yi[None], reduction="sum") / N

    per = vmap(grad(share), in_dims=(None, 0, 0))(params, x, y)
    v = torch.cat([per[k].reshape(N, -1) for k in _norm_params(model)], 1)
    torch.testing.assert_close(pre.store[name].A, (v ** 2).sum(0) / N, rtol=1e-9, atol=1e-14)


class LayerNormSubclass(nn.LayerNorm):
    """A subclass that keeps PyTorch's forward: the formula applies."""


class Standardize(nn.LayerNorm):
    """A subclass with its own forward and no 'Norm' in its name (torchvision's LayerNorm2d pattern)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 2, 1)


@pytest.mark.parametrize("cls, adapter", [(LayerNormSubclass, kfac.modules.NormAdapter),
                                          (Standardize, kfac.modules.ScaleShiftAdapter)])
def test_subclasses_of_pytorch_norms_are_matched_by_type(cls, adapter):
    torch.manual_seed(0)
    model = nn.Sequential(cls(E), nn.Flatten(), nn.Linear(E * 3, 1)).double()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    assert type(pre.adapters["0"]) is adapter
    x = torch.randn(N, 3, E, dtype=torch.float64) if cls is LayerNormSubclass else torch.randn(N, E, 3).double()
    y = torch.randn(N, 1, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    pre.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    per = vmap(grad(lambda p, xi, yi: F.mse_loss(functional_call(model, p, (xi[None],)), yi[None],
                                                 reduction="sum") / N), in_dims=(None, 0, 0))(params, x, y)
    v = torch.cat([per["0.weight"], per["0.bias"]], 1)
    torch.testing.assert_close(pre.store["0"].A, (v ** 2).sum(0) / N, rtol=1e-9, atol=1e-14)


class BatchStatNorm(nn.Module):
    """Another library's norm that normalises each feature over the batch (unbiased variance: one example alone
    gives NaN; with ``strict_shape`` it only accepts ``(N, 7)`` inputs, so no probe at construction can run)."""

    def __init__(self, d: int, strict_shape: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.strict_shape = strict_shape

    def forward(self, x):
        if self.strict_shape and (x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != 7):
            raise ValueError("expects (N, 7)")
        return (x - x.mean(0)) / (x.var(0) + 1e-5).sqrt() * self.weight + self.bias


def _coupled_model(strict: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), BatchStatNorm(7, strict), nn.Tanh(), nn.Linear(7, 3)).double()


def _step(model, pre, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for n, m in
           (("0", model[0]), ("3", model[3]))}
    assert pre.step()
    return x, raw


def test_norm_over_the_batch_is_refused_at_construction_and_the_others_are_preconditioned():
    model = _coupled_model(strict=False)
    with pytest.warns(UserWarning, match="normalises over the batch"):
        pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    assert pre.layers == ["0", "3"]
    assert any(n == "1" and "normalises over the batch" in r for n, r in pre.skipped)
    x, raw = _step(model, pre, 0)
    a = torch.cat([x, torch.ones(16, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(pre.store["0"].A, a.T @ a / 16, rtol=1e-10, atol=1e-12)
    expected = pre.method.precondition(pre.store["3"], raw["3"], damping=pre.hparams.at(0)["damping"])
    torch.testing.assert_close(torch.cat([model[3].weight.grad, model[3].bias.grad[:, None]], 1), expected)
    assert not torch.allclose(expected, raw["3"])


def test_norm_over_the_batch_found_at_first_statistics_is_untracked_loudly_the_rest_stay():
    model = _coupled_model(strict=True)  # the construction probe cannot run it
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    assert pre.layers == ["0", "1", "3"]
    with pytest.warns(UserWarning, match=r"layer '1' untracked: BatchStatNorm normalises over the batch"):
        x, _ = _step(model, pre, 0)
    assert pre.layers == ["0", "3"] and any(n == "1" for n, _ in pre.skipped)
    a = torch.cat([x, torch.ones(16, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(pre.store["0"].A, a.T @ a / 16, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not every step
        for seed in (1, 2):
            _, raw = _step(model, pre, seed)
    assert pre.store["0"].num_updates == 3 and pre.store["3"].num_updates == 3
    assert not torch.allclose(model[3].weight.grad, raw["3"][:, :-1])


BAD_FIRST_LAYER = {  # a first layer whose A overflows on inputs of 1e200 while its gradients stay finite
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (8, 4), ["2"]),
    "cnn_groupnorm": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                                            nn.Flatten(), nn.Linear(4 * 9, 3)), (8, 1, 3, 3), ["1", "4"]),
    "transformer_sequence_first": (lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0), nn.Flatten(0, 1), nn.Linear(8, 3)), (2, 4, 4), None),
}


@pytest.mark.parametrize("case", sorted(BAD_FIRST_LAYER))
def test_layer_with_non_finite_statistics_every_step_is_untracked_after_three_the_rest_stay(case):
    build, shape, rest = BAD_FIRST_LAYER[case]
    torch.manual_seed(0)
    model = build().double()
    pre = kfac.KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64, factor_decay=0.0)
    rest = rest or pre.layers[1:]
    big = torch.full(shape, 1e200, dtype=torch.float64)  # A of layer '0' overflows; tanh/GroupNorm keep gradients
    y = torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            model.zero_grad()
            F.cross_entropy(model(big), y).backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            assert pre.step()
    messages = [str(w.message) for w in record]
    assert sum("layer '0': non-finite factor statistics" in m for m in messages) == 1
    assert any("layer '0' untracked" in m for m in messages)
    assert pre.layers == rest and all(pre.store[n].num_updates == 3 for n in rest)
