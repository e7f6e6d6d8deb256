"""Bad input and failure handling: non-finite gradients, misuse, unsupported models, functional layers,
decomposition failures, invalid hyperparameters, mismatched state, Monte-Carlo Fisher misuse."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch
from torch import nn

import kfac

from helpers import batch as _batch, mlp as _mlp, single_thread  # noqa: F401  (autouse fixture)
from helpers import grad_matrix as _gmat, loss as _loss, train as _train

FLOAT64 = torch.float64


def _snapshot(model, opt):
    factors = {n: {k: (getattr(e, k).clone() if getattr(e, k) is not None else None)
                   for k in ("A", "G", "QA", "dA", "QG", "dG", "A_inv", "G_inv")} | {"n": e.num_updates}
               for n, e in opt.store.items()}
    base = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.optimizer.state.items()}
    return factors, [p.detach().clone() for p in model.parameters()], base, opt.preconditioner.steps


def _assert_same_snapshot(a, b):
    fa, pa, ba, sa = a
    fb, pb, bb, sb = b
    assert sa == sb
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))
    assert fa.keys() == fb.keys()
    for n in fa:
        for k, v in fa[n].items():
            w = fb[n][k]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), (n, k)
            else:
                assert v == w, (n, k)
    assert ba.keys() == bb.keys()
    for pid in ba:
        assert ba[pid].keys() == bb[pid].keys()
        for k in ba[pid]:
            assert torch.equal(ba[pid][k], bb[pid][k])


# -- non-finite gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["weight_inf", "bias_nan", "loss_inf"])
def test_non_finite_gradients_skip_step(where, caplog):
    model = _mlp()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = kfac.KFAC(model, base)
    _train(model, opt, 2)
    before = _snapshot(model, opt)

    opt.zero_grad()
    loss = _loss(model, 7)
    handle = None
    if where == "weight_inf":
        handle = model[2].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    elif where == "bias_nan":
        handle = model[0].bias.register_hook(lambda g: torch.full_like(g, float("nan")))
    else:
        loss = loss * float("inf")
    loss.backward()
    if handle is not None:
        handle.remove()
    with caplog.at_level(logging.WARNING, logger="kfac"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(model, opt))
    assert opt.preconditioner.skipped_steps == 1
    records = [r for r in caplog.records if r.name == "kfac" and r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "non-finite" in records[0].getMessage() and "skipped" in records[0].getMessage()

    # training continues: the next finite step is the third real step (step index 2)
    _train(model, opt, 1, start=8)
    assert opt.preconditioner.steps == 3 and opt.preconditioner.skipped_steps == 1
    assert all(opt.store[n].num_updates == 3 for n in opt.preconditioner.layers)


def test_non_finite_factor_statistics_with_finite_gradients_skip_factor_update_only():
    """Inputs of 1e20 overflow A = a^T a in float32 while tanh saturation keeps every gradient finite: the
    statistics are dropped (factors untouched, warning logged, counted) and the step preconditions with the
    current factors."""
    model = _mlp()
    pre = kfac.KFACPreconditioner(model, kl_clip=None)
    x, y = _batch(0)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert pre.step()
    A, G = pre.store["0"].A.clone(), pre.store["0"].G.clone()

    model.zero_grad()
    big = torch.full((8, 4), 1e20)
    nn.functional.cross_entropy(model(big), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    raw = {name: dict(model.named_modules())[name] for name in pre.layers}
    raw = {name: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for name, m in raw.items()}
    with pytest.warns(UserWarning, match="layer '0': non-finite factor statistics at step 1"):
        assert pre.step() is True
    assert pre.skipped_steps == 0 and pre.discarded_statistics == 1 and pre.steps == 2
    assert torch.equal(pre.store["0"].A, A) and torch.equal(pre.store["0"].G, G)
    assert pre.store["0"].num_updates == 1
    for name, g in raw.items():
        m = dict(model.named_modules())[name]
        expected = pre.method.precondition(pre.store[name], g, damping=1e-3)
        torch.testing.assert_close(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1), expected)


def test_non_finite_gradient_in_untracked_parameter_skips_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, opt, 1)
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    handle = model[1].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    _loss(model, 3).backward()
    handle.remove()
    opt.step()
    assert opt.preconditioner.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


# -- misuse --------------------------------------------------------------------------------------------------
def test_step_before_backward():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()
    _loss(model, 0)  # a forward alone is not enough
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()
    pre = kfac.KFACPreconditioner(_mlp())
    with pytest.raises(RuntimeError, match="backward"):
        pre.step()


def test_eval_mode_forward_raises():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    _loss(model, 0).backward()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    # after switching to training mode everything works
    model.train()
    _train(model, opt, 1)
    assert opt.preconditioner.steps == 1 and opt.store["0"].num_updates == 1


def test_no_forward_raises():
    model = _mlp()
    pre = kfac.KFACPreconditioner(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="forward"):
        pre.step()


def test_empty_model_raises():
    with pytest.raises(ValueError, match="no supported layers.*no parameters"):
        kfac.KFACPreconditioner(nn.Sequential())


def test_only_unsupported_layers_raises():
    model = nn.Sequential(nn.LSTM(3, 3), nn.GRU(3, 3), nn.Bilinear(3, 3, 3))
    with pytest.raises(ValueError, match="no supported layers") as info:
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    msg = str(info.value)
    assert "LSTM" in msg and "GRU" in msg and "Bilinear" in msg


def test_model_must_be_module():
    with pytest.raises(TypeError, match="nn.Module"):
        kfac.KFACPreconditioner([nn.Linear(2, 2)])


# -- layers executed functionally ----------------------------------------------------------------------------
class _AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def _attn_batch(i):
    g = torch.Generator().manual_seed(50 + i)
    return torch.randn(4, 5, 4, generator=g), torch.randint(0, 3, (4,), generator=g)


def _attn_make(seed=0):
    torch.manual_seed(seed)
    model = _AttnNet()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                    factor_update_steps=2, inv_update_steps=3)
    return model, opt


def _attn_train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        x, y = _attn_batch(i)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_multihead_attention_projections_are_preconditioned_every_step():
    """nn.MultiheadAttention applies in_proj and out_proj functionally: both are tracked (observed through the
    attention module's forward), collect statistics at every factor step and are preconditioned; no warning."""
    model, opt = _attn_make()
    pre = opt.preconditioner
    assert pre.layers == ["inp", "attn", "attn.out_proj", "head"] and not pre.skipped
    assert not model.attn.out_proj._forward_hooks  # observed through its parent, not a (never firing) hook
    opt.zero_grad()
    x, y = _attn_batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    raw_out = torch.cat([model.attn.out_proj.weight.grad, model.attn.out_proj.bias.grad[:, None]], 1).clone()
    raw_in = model.attn.in_proj_weight.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every tracked layer runs
        opt.step()
    out = torch.cat([model.attn.out_proj.weight.grad, model.attn.out_proj.bias.grad[:, None]], 1)
    assert not torch.allclose(out, raw_out) and not torch.allclose(model.attn.in_proj_weight.grad, raw_in)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _attn_train(model, opt, 3, start=1)
    assert pre.steps == 4 and all(pre.store[n].num_updates == 2 for n in pre.layers)
    assert pre.unused_layers == []


def test_multihead_attention_resume_is_bit_identical():
    n_first, n_more = 3, 4
    ref_model, ref_opt = _attn_make()
    _attn_train(ref_model, ref_opt, n_first + n_more)

    model, opt = _attn_make()
    _attn_train(model, opt, n_first)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model2, opt2 = _attn_make(seed=99)
    model2.load_state_dict(ckpt["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(ckpt["opt"])
        assert opt2.preconditioner.layers == ["inp", "attn", "attn.out_proj", "head"]
        _attn_train(model2, opt2, n_more, start=n_first)
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_of_an_older_version_with_not_executed_layers_loads():
    """Checkpoints written when unexecuted layers were dropped at step 0 list them in "not_executed": loading one
    untracks those layers again (the saved store has no entry for them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 3))
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.05))
    state = opt.state_dict()
    legacy = dict(state["kfac"])
    legacy["layers"] = ["0", "2"]
    legacy["not_executed"] = ["3"]
    legacy["store"] = {**legacy["store"], "entries": {k: v for k, v in legacy["store"]["entries"].items() if k != "3"}}
    legacy.pop("shard")
    legacy.pop("seen")
    opt.load_state_dict({**state, "kfac": legacy})
    assert opt.preconditioner.layers == ["0", "2"] and opt.preconditioner.not_executed == ["3"]
    assert not model[3]._forward_hooks


# -- decomposition failures ----------------------------------------------------------------------------------
def _sym(m):
    return (m + m.T) / 2


def _one_step(method, monkeypatch=None, patch=None, dtype=torch.float32, **kw):
    """One K-FAC step (kl_clip off); returns (model, pre, raw grads, preconditioned grads) of layers 0 and 2."""
    model = _mlp(dtype)
    pre = kfac.KFACPreconditioner(model, method=method, kl_clip=None, damping=1e-2, factor_dtype=dtype, **kw)
    model.zero_grad()
    _loss(model, 0, dtype).backward()
    raw = [_gmat(model[0]), _gmat(model[2])]
    if patch is not None:
        monkeypatch.setattr(*patch)
    try:
        pre.step()
    finally:
        if patch is not None:
            monkeypatch.undo()
    return model, pre, raw, [_gmat(model[0]), _gmat(model[2])]


def test_eigh_float32_failure_retries_in_float64(monkeypatch):
    orig = torch.linalg.eigh
    calls = []

    def flaky(m, *args, **kwargs):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("fake float32 failure")
        return orig(m, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, pre, _, _ = _one_step("eigen", monkeypatch, (torch.linalg, "eigh", flaky))
    assert calls == [torch.float32, torch.float64] * 4  # A and G of two layers
    for name in pre.layers:
        e = pre.store[name]
        for fac, d, q in ((e.A, e.dA, e.QA), (e.G, e.dG, e.QG)):
            d_ref, q_ref = orig(_sym(fac).to(FLOAT64))
            assert d.dtype == q.dtype == torch.float32
            assert torch.equal(d, d_ref.clamp(min=0).float())
            assert torch.equal(q, q_ref.float())


def test_eigh_failure_in_all_dtypes_uses_plain_gradient(monkeypatch):
    orig = torch.linalg.eigh

    def broken_for_a0(m, *args, **kwargs):  # layer "0" has a_dim 5; no other factor is 5x5
        if m.shape[0] == 5:
            raise torch.linalg.LinAlgError("fake failure")
        return orig(m, *args, **kwargs)

    _, _, _, ref = _one_step("eigen")
    with pytest.warns(UserWarning, match="plain gradient") as record:
        model, pre, raw, out = _one_step("eigen", monkeypatch, (torch.linalg, "eigh", broken_for_a0))
    assert any("'0'" in str(w.message) for w in record)
    assert torch.equal(out[0], raw[0])  # layer 0: plain gradient
    assert torch.equal(out[1], ref[1])  # layer 2: preconditioned exactly as without the failure
    assert not torch.equal(out[1], raw[1])
    e = pre.store["0"]
    assert e.A is not None and e.num_updates == 1
    assert e.QA is None and e.dA is None  # the failed factor has no decomposition ...
    assert not pre.method.ready(e)  # ... so the layer is not preconditioned until the next refresh
    # next refresh (no failure) restores preconditioning for the layer
    model.zero_grad()
    _loss(model, 1).backward()
    pre.step()
    assert torch.equal(e.dA, orig(_sym(e.A))[0].clamp(min=0))


def test_inverse_cholesky_float32_failure_retries_in_float64(monkeypatch):
    orig = torch.linalg.cholesky_ex

    def flaky(m, *args, **kwargs):
        L, info = orig(m, *args, **kwargs)
        return (L, torch.ones_like(info)) if m.dtype == torch.float32 else (L, info)

    damping = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, pre, _, _ = _one_step("inverse", monkeypatch, (torch.linalg, "cholesky_ex", flaky))
    for name in pre.layers:
        e = pre.store[name]
        for fac, inv in ((e.A, e.A_inv), (e.G, e.G_inv)):
            n = fac.shape[0]
            x = _sym(fac).to(FLOAT64) + damping * torch.eye(n, dtype=torch.float32).to(FLOAT64)
            ref = torch.cholesky_inverse(orig(x)[0]).float()
            assert inv.dtype == torch.float32
            assert torch.equal(inv, ref)


def test_inverse_cholesky_failure_in_all_dtypes_uses_plain_gradient(monkeypatch):
    orig = torch.linalg.cholesky_ex

    def broken_for_a0(m, *args, **kwargs):
        L, info = orig(m, *args, **kwargs)
        return (L, torch.ones_like(info)) if m.shape[0] == 5 else (L, info)

    _, _, _, ref = _one_step("inverse")
    with pytest.warns(UserWarning, match="plain gradient"):
        _, pre, raw, out = _one_step("inverse", monkeypatch, (torch.linalg, "cholesky_ex", broken_for_a0))
    assert torch.equal(out[0], raw[0])
    assert torch.equal(out[1], ref[1]) and not torch.equal(out[1], raw[1])
    assert pre.store["0"].A_inv is None and not pre.method.ready(pre.store["0"])
    assert pre.store["2"].A_inv is not None


def _two_steps_with_corrupted_factor(method, corrupt, dtype=FLOAT64):
    model = _mlp(dtype)
    pre = kfac.KFACPreconditioner(model, method=method, kl_clip=None, damping=1e-2, factor_dtype=dtype,
                                  factor_update_steps=100, inv_update_steps=1)
    model.zero_grad()
    _loss(model, 0, dtype).backward()
    pre.step()
    corrupt(pre.store["0"])
    model.zero_grad()
    _loss(model, 1, dtype).backward()
    raw = [_gmat(model[0]), _gmat(model[2])]
    return model, pre, raw


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_non_finite_factor_uses_plain_gradient(method):
    def corrupt(e):
        e.A[0, 0] = float("nan")

    model, pre, raw = _two_steps_with_corrupted_factor(method, corrupt)
    with pytest.warns(UserWarning, match="non-finite.*plain gradient"):
        assert pre.step()
    assert torch.equal(_gmat(model[0]), raw[0])
    assert not torch.equal(_gmat(model[2]), raw[1])
    assert pre.steps == 2


def test_indefinite_factor_inverse_uses_plain_gradient():
    def corrupt(e):
        e.G.copy_(-torch.eye(e.g_dim, dtype=e.G.dtype))

    model, pre, raw = _two_steps_with_corrupted_factor("inverse", corrupt)
    with pytest.warns(UserWarning, match="plain gradient"):
        pre.step()
    assert torch.equal(_gmat(model[0]), raw[0])


def test_indefinite_factor_eigen_clamps_eigenvalues():
    """G = -I has eigenvalues clamped to 0, so P(V) = QG QG^T V QA QA^T / damping = V / damping."""
    def corrupt(e):
        e.G.copy_(-torch.eye(e.g_dim, dtype=e.G.dtype))

    model, pre, raw = _two_steps_with_corrupted_factor("eigen", corrupt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.step()
    assert torch.equal(pre.store["0"].dG, torch.zeros(6, dtype=FLOAT64))
    torch.testing.assert_close(_gmat(model[0]), raw[0] / 1e-2, rtol=1e-10, atol=1e-12)


# -- invalid hyperparameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(damping=0), ValueError, "damping"),
    (dict(damping=-1e-3), ValueError, "damping"),
    (dict(damping=float("nan")), ValueError, "damping"),
    (dict(damping=float("inf")), ValueError, "damping"),
    (dict(damping=lambda s: "big"), TypeError, "damping"),
    (dict(damping=lambda s: None), TypeError, "damping"),
    (dict(damping=True), TypeError, "damping"),
    (dict(factor_decay=1), ValueError, "factor_decay"),
    (dict(factor_decay=1.5), ValueError, "factor_decay"),
    (dict(factor_decay=-0.1), ValueError, "factor_decay"),
    (dict(factor_decay=lambda s: "0.9"), TypeError, "factor_decay"),
    (dict(factor_update_steps=0), ValueError, "factor_update_steps"),
    (dict(factor_update_steps=-2), ValueError, "factor_update_steps"),
    (dict(factor_update_steps=1.5), ValueError, "factor_update_steps"),
    (dict(factor_update_steps=lambda s: 0), ValueError, "factor_update_steps"),
    (dict(factor_update_steps=lambda s: "10"), TypeError, "factor_update_steps"),
    (dict(inv_update_steps=0), ValueError, "inv_update_steps"),
    (dict(inv_update_steps=lambda s: [1]), TypeError, "inv_update_steps"),
    (dict(kl_clip=0), ValueError, "kl_clip"),
    (dict(kl_clip=-1.0), ValueError, "kl_clip"),
    (dict(kl_clip=lambda s: "x"), TypeError, "kl_clip"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(method="foo"), ValueError, "method"),
    (dict(fisher="foo"), ValueError, "fisher"),
    (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
    (dict(factor_dtype=torch.int64), ValueError, "factor_dtype"),
])
def test_invalid_hyperparameters(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        kfac.KFACPreconditioner(_mlp(), **kwargs)
    if "lr" not in kwargs:
        model = _mlp()
        with pytest.raises(exc, match=name):
            kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_float_step_counts_that_are_integers_are_accepted():
    pre = kfac.KFACPreconditioner(_mlp(), factor_update_steps=2.0, inv_update_steps=4.0)
    assert pre.steps == 0


def test_schedule_turning_invalid_later_raises_and_changes_nothing():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    damping=lambda s: 1e-3 if s < 2 else -1.0)
    _train(model, opt, 2)
    before = _snapshot(model, opt)
    opt.zero_grad()
    _loss(model, 2).backward()
    with pytest.raises(ValueError, match="damping"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(model, opt))


def test_factor_update_schedule_turning_invalid_raises_naming_it():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_update_steps=lambda s: 1 if s < 1 else 0)
    _train(model, opt, 1)
    with pytest.raises(ValueError, match="factor_update_steps"):
        _train(model, opt, 1, start=1)


def test_kfac_rejects_lr_keyword_and_non_optimizer():
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="lr"):
        kfac.KFAC(model, base, lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        kfac.KFAC(model, "sgd")


# -- mismatched state ----------------------------------------------------------------------------------------
def test_load_state_dict_from_different_model_names_layers():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, opt, 1)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    pre = kfac.KFACPreconditioner(other)
    with pytest.raises(ValueError) as info:
        pre.load_state_dict(opt.preconditioner.state_dict())
    assert "'4'" in str(info.value) and "missing" in str(info.value)
    pre.remove()  # one live preconditioner per model

    other_opt = kfac.KFAC(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="'4'"):
        other_opt.load_state_dict(opt.state_dict())

    renamed = nn.Sequential()
    renamed.add_module("enc", nn.Linear(4, 6))
    renamed.add_module("act", nn.Tanh())
    renamed.add_module("dec", nn.Linear(6, 3))
    with pytest.raises(ValueError) as info:
        kfac.KFACPreconditioner(renamed).load_state_dict(opt.preconditioner.state_dict())
    for name in ("'enc'", "'dec'", "'0'", "'2'"):
        assert name in str(info.value)


def test_load_state_dict_with_different_dims_names_layer():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, opt, 1)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))  # same names, layer 2 wider
    with pytest.raises(ValueError, match="'2'"):  # FactorFileError is a ValueError
        kfac.KFACPreconditioner(other).load_state_dict(opt.preconditioner.state_dict())


# -- Monte-Carlo Fisher misuse -------------------------------------------------------------------------------
def test_mc_backward_with_empirical_fisher_raises():
    model = _mlp()
    pre = kfac.KFACPreconditioner(model, fisher="empirical")
    x, _ = _batch(0)
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        pre.mc_backward(model(x))


def test_mc_fisher_without_mc_backward_at_factor_step_raises():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), fisher="mc", factor_update_steps=2)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):  # step 0 (factor step) with mc_backward; step 1 (no factor update) without
        opt.zero_grad()
        x, y = _batch(i)
        out = model(x)
        if i == 0:
            opt.preconditioner.mc_backward(out, generator=gen)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert opt.preconditioner.steps == 2 and opt.store["0"].num_updates == 1
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, 2).backward()  # step 2 is a factor step: mc_backward missing
    with pytest.raises(RuntimeError, match="mc_backward"):
        opt.step()
    assert opt.preconditioner.steps == 2 and opt.store["0"].num_updates == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
