"""Reliability of the K-FAC optimizer in one process: branches not taken at step 0, non-finite preconditioned
gradients (never reaching the parameters), weight sharing, keyword inputs, empty batches, clear errors for misuse,
local state dicts, torch.compile and activation checkpointing. Math is compared in float64 against dense
references (or against an equivalent plain run)."""

from __future__ import annotations

import copy
import importlib
import io
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kfac

from helpers import batch as _batch, mlp as _mlp, single_thread  # noqa: F401  (autouse fixture)
from helpers import grad_matrix as _gmat, loss as _loss, params as _params, train as _train

FLOAT64 = torch.float64


def _dense_kfac(A: torch.Tensor, G: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """``(A (x) G + damping I)^-1 vec(g)`` from the factors themselves (own eigendecompositions, float64,
    eigenvalues clamped at 0 as the library does)."""
    A, G, g = A.double(), G.double(), g.double()
    dA, QA = torch.linalg.eigh((A + A.T) / 2)
    dG, QG = torch.linalg.eigh((G + G.T) / 2)
    dA, dG = dA.clamp(min=0), dG.clamp(min=0)
    return QG @ ((QG.T @ g @ QA) / (torch.outer(dG, dA) + damping)) @ QA.T


def _from_decompositions(e, g: torch.Tensor, damping: float) -> torch.Tensor:
    """``P(g) = QG [(QG^T g QA) / (dG dA^T + damping)] QA^T`` with the store's (possibly stale) decompositions."""
    return e.QG @ ((e.QG.T @ g.to(e.QG.dtype) @ e.QA) / (torch.outer(e.dG, e.dA) + damping)) @ e.QA.T


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- 1. a branch not taken at step 0 ---------------------------------------------------------------------------
class _Branchy(nn.Module):
    """``head2`` only runs when the batch asks for it (a data-dependent branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head1 = nn.Linear(6, 3)
        self.head2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_head2: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        out = self.head1(h)
        if bool(use_head2):
            out = out + self.head2(h)
        return out


def test_branch_not_taken_at_step_0_is_tracked_then_preconditioned():
    torch.manual_seed(0)
    model = _Branchy().double()
    damping = 1e-2
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_update_steps=1, inv_update_steps=1,
                    damping=damping, kl_clip=None, factor_dtype=FLOAT64)
    pre = opt.preconditioner
    assert pre.layers == ["fc", "head1", "head2"]
    head2_before = _params(model.head2)
    for step in range(4):
        x, y = _batch(step, FLOAT64)
        use = torch.tensor(step >= 2)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, use), y).backward()
        raw = _gmat(model.head2) if step >= 2 else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        unused_warnings = [w for w in caught if "ran no forward pass" in str(w.message)]
        if step == 0:
            assert len(unused_warnings) == 1, [str(w.message) for w in caught]
            assert issubclass(unused_warnings[0].category, UserWarning)
            assert "head2" in str(unused_warnings[0].message)
            assert "head1" not in str(unused_warnings[0].message)
        else:
            assert unused_warnings == []
        assert pre.layers == ["fc", "head1", "head2"]  # still tracked
        if step < 2:
            assert pre.unused_layers == ["head2"]
            assert pre.store["head2"].num_updates == 0
            assert model.head2.weight.grad is None
            assert all(torch.equal(p, q) for p, q in zip(model.head2.parameters(), head2_before))
        else:
            assert pre.unused_layers == []
            e = pre.store["head2"]
            assert e.num_updates == step - 1
            expected = _dense_kfac(e.A, e.G, raw, damping)
            got = _gmat(model.head2)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-13)
            assert not torch.allclose(got, raw)  # really preconditioned
            # and the decompositions used are those of the store's factors
            torch.testing.assert_close(_from_decompositions(e, raw, damping), expected, rtol=1e-9, atol=1e-13)
    assert _all_finite(model)
    assert pre.fallbacks == {}


# -- 2. non-finite preconditioned gradients never reach the parameters ---------------------------------------------
def _wide_mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def test_tiny_damping_with_rank_deficient_float32_factors_falls_back_to_plain_gradient():
    """damping=1e-45 (a float32 denormal) with factors of rank 5 < 17 (factor_decay=0: the batch factor itself):
    1 / (0 + damping) overflows float32. The affected layer keeps its plain gradient, bit for bit."""
    model = _wide_mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), damping=1e-45, factor_decay=0.0,
                    kl_clip=None, factor_dtype=torch.float32, inv_update_steps=1)
    pre = opt.preconditioner
    layers = {"0": model[0], "2": model[2]}
    messages = []
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 16, generator=g), torch.randint(0, 3, (4,), generator=g)  # 4 rows < 16 inputs
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {n: _gmat(m) for n, m in layers.items()}
        before = dict(pre.fallbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert opt.step() is None
        messages += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert pre.steps == step + 1  # never skipped: the gradients themselves are finite
        for n, m in layers.items():
            got = _gmat(m)
            assert torch.isfinite(got).all(), (step, n)
            if pre.fallbacks.get(n, 0) > before.get(n, 0):
                assert pre.fallbacks[n] == before.get(n, 0) + 1
                assert torch.equal(got, raw[n]), (step, n)
        assert _all_finite(model), step
    assert pre.fallbacks.get("0", 0) > 0, pre.fallbacks  # the rank-deficient input factor (17 x 17, rank <= 5)
    assert any("non-finite preconditioned gradient" in msg and "'0'" in msg for msg in messages), messages
    assert pre.skipped_steps == 0


@pytest.mark.parametrize("factor_update_steps", [1, 100], ids=["factor-update-step", "precondition-only-step"])
def test_nan_in_decomposition_uses_plain_gradient_for_that_layer_only(factor_update_steps):
    model = _mlp(FLOAT64)
    damping = 1e-2
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), damping=damping, kl_clip=None,
                    factor_dtype=FLOAT64, factor_update_steps=factor_update_steps, inv_update_steps=100)
    pre = opt.preconditioner
    _train(model, opt, 1, dtype=FLOAT64)  # step 0: factors and decompositions
    pre.store["0"].QA[0, 0] = float("nan")
    messages = []
    for step in (1, 2):
        opt.zero_grad()
        _loss(model, step, FLOAT64).backward()
        raw0, raw2 = _gmat(model[0]), _gmat(model[2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        messages += [str(w.message) for w in caught]
        assert torch.equal(_gmat(model[0]), raw0)  # plain gradient, exactly
        expected2 = _from_decompositions(pre.store["2"], raw2, damping)
        torch.testing.assert_close(_gmat(model[2]), expected2, rtol=1e-10, atol=1e-14)
        assert not torch.allclose(expected2, raw2)
        assert pre.fallbacks == {"0": step}
        assert _all_finite(model)
    # warned once per refresh, naming the layer
    fallback_msgs = [m for m in messages if "non-finite preconditioned gradient" in m]
    assert len(fallback_msgs) == 1 and "'0'" in fallback_msgs[0], messages
    assert pre.skipped_steps == 0


def test_float16_factor_dtype_is_rejected():
    model = _mlp()
    with pytest.raises(ValueError, match="factor_dtype"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_dtype=torch.float16)
    with pytest.raises(ValueError, match="factor_dtype"):
        kfac.KFACPreconditioner(model, factor_dtype=torch.bfloat16)


def _autoencoder(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    widths = [16, 32, 32, 24, 8, 24, 32, 32, 16]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("lr", [0.1, 1.0])
def test_deep_tanh_autoencoder_parameters_stay_finite(lr):
    model = _autoencoder()
    assert sum(isinstance(m, nn.Linear) for m in model) == 8
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=lr), damping=1e-3, kl_clip=None)
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
    start = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback warnings are allowed; non-finite parameters are not
        for step in range(30):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(data), data)
            assert torch.isfinite(loss), step
            loss.backward()
            opt.step()
            assert _all_finite(model), step
    assert opt.preconditioner.steps + opt.preconditioner.skipped_steps == 30
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_mfac_non_finite_block_falls_back_to_plain_gradient(monkeypatch):
    model = _mlp(FLOAT64)
    opt = kfac.MFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), num_grads=4, damping=1e-2)
    pre = opt.preconditioner
    assert pre.layers == ["0", "2"]
    _train(model, opt, 2, dtype=FLOAT64)
    clean: dict[str, torch.Tensor] = {}
    original = pre._fisher.ihvp

    def poisoned(vectors, *args, **kwargs):
        out = dict(original(vectors, *args, **kwargs))
        clean.update({k: v.clone() for k, v in out.items()})
        out["0"] = out["0"].clone()
        out["0"][1, 2] = float("nan")
        return out

    monkeypatch.setattr(pre._fisher, "ihvp", poisoned)
    opt.zero_grad()
    _loss(model, 2, FLOAT64).backward()
    raw0, raw2 = _gmat(model[0]), _gmat(model[2])
    with pytest.warns(UserWarning, match="non-finite M-FAC update") as record:
        opt.step()
    assert any("'0'" in str(w.message) for w in record)
    assert torch.equal(_gmat(model[0]), raw0)
    torch.testing.assert_close(_gmat(model[2]), clean["2"].to(FLOAT64), rtol=0, atol=0)
    assert not torch.allclose(clean["2"], raw2)
    assert _all_finite(model)
    assert pre.steps == 3 and pre.skipped_steps == 0


# -- 3. weight sharing in one process ------------------------------------------------------------------------------
class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.captured: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.lin(x)
        t1 = torch.tanh(h1)
        h2 = self.lin(t1)  # the same Linear, a second time
        t2 = torch.tanh(h2)
        for h in (h1, h2, t2):
            h.retain_grad()
        self.captured = [x, h1, t1, h2, t2]
        return self.head(t2)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def test_weight_shared_layer_factors_match_dense_definitions():
    torch.manual_seed(0)
    model = _Shared().double()
    damping = 1e-2
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_decay=0.0, damping=damping,
                    kl_clip=None, factor_dtype=FLOAT64)
    pre = opt.preconditioner
    assert pre.layers == ["lin", "head"]
    x, y = _batch(0, FLOAT64, n=8)
    n = x.shape[0]
    opt.zero_grad()
    out = model(x)
    out.retain_grad()
    nn.functional.cross_entropy(out, y).backward()
    x_, h1, t1, h2, t2 = model.captured
    raw_lin, raw_head = _gmat(model.lin), _gmat(model.head)
    opt.step()
    # shared layer: 2N rows of inputs and 2N rows of output gradients (as autograd delivers them, mean loss)
    a = torch.cat([_ones(x_), _ones(t1.detach())])
    g = torch.cat([h1.grad, h2.grad])
    A_dense = a.T @ a / (2 * n)
    G_dense = g.T @ g / (2 * n)
    e = pre.store["lin"]
    torch.testing.assert_close(e.A, A_dense, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(e.G, G_dense, rtol=1e-12, atol=1e-15)
    # the head (used once) for comparison
    a_h = _ones(t2.detach())
    torch.testing.assert_close(pre.store["head"].A, a_h.T @ a_h / n, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pre.store["head"].G, out.grad.T @ out.grad / n, rtol=1e-12, atol=1e-15)
    # the raw shared gradient is the sum over both uses; its preconditioned version uses the dense factors
    torch.testing.assert_close(raw_lin, h1.grad.T @ _ones(x_) + h2.grad.T @ _ones(t1.detach()), rtol=1e-12,
                               atol=1e-15)
    torch.testing.assert_close(_gmat(model.lin), _dense_kfac(A_dense, G_dense, raw_lin, damping), rtol=1e-9,
                               atol=1e-13)
    assert not torch.allclose(_gmat(model.head), raw_head)
    assert e.num_updates == 1 and pre.unused_layers == []


# -- 4. keyword-argument inputs --------------------------------------------------------------------------------------
class _KwargsMLP(nn.Module):
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keyword:
            return self.out(input=torch.tanh(self.fc(input=x)))
        return self.out(torch.tanh(self.fc(x)))


def test_keyword_input_gives_the_same_factors_and_gradients():
    torch.manual_seed(0)
    ref = _KwargsMLP(keyword=False).double()
    runs = []
    for keyword in (False, True):
        model = copy.deepcopy(ref)
        model.keyword = keyword
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_dtype=FLOAT64, damping=1e-2)
        grads = []
        for i in range(3):
            opt.zero_grad()
            _loss(model, i, FLOAT64).backward()
            opt.step()
            grads.append([p.grad.clone() for p in model.parameters()])
        runs.append((model, opt, grads))
    (m_pos, o_pos, g_pos), (m_kw, o_kw, g_kw) = runs
    assert o_kw.preconditioner.unused_layers == []
    for name in ("fc", "out"):
        e_pos, e_kw = o_pos.store[name], o_kw.store[name]
        assert e_kw.num_updates == e_pos.num_updates == 3
        assert torch.equal(e_kw.A, e_pos.A) and torch.equal(e_kw.G, e_pos.G), name
    for step, (gp, gk) in enumerate(zip(g_pos, g_kw)):
        assert all(torch.equal(a, b) for a, b in zip(gp, gk)), step
    assert all(torch.equal(a, b) for a, b in zip(m_pos.parameters(), m_kw.parameters()))


# -- 5. empty (0-row) batches -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_empty_micro_batch_in_accumulation_changes_nothing(method):
    ref = _mlp(FLOAT64)
    results = []
    for accumulation in (1, 2):
        model = copy.deepcopy(ref)
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method=method,
                        accumulation_steps=accumulation, factor_update_steps=1, inv_update_steps=2, damping=1e-2,
                        factor_dtype=FLOAT64)
        for i in range(4):
            x, y = _batch(i, FLOAT64)
            n = x.shape[0]
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x), y, reduction="sum") / n).backward()
            if accumulation == 2:  # a 0-row micro-batch, same normalisation
                (nn.functional.cross_entropy(model(x[:0]), y[:0], reduction="sum") / n).backward()
            opt.step()
        assert all(opt.store[name].num_updates == 4 for name in opt.preconditioner.layers)
        results.append((model, opt))
    (m1, o1), (m2, o2) = results
    assert _all_finite(m2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10)
    for name in o1.preconditioner.layers:
        torch.testing.assert_close(o2.store[name].A, o1.store[name].A, rtol=0, atol=1e-12)
        torch.testing.assert_close(o2.store[name].G, o1.store[name].G, rtol=0, atol=1e-12)
        if method == "ekfac":  # corrections applied (step 3 is not a refresh step), and equal
            lam1, lam2 = o1.store[name].extras["Lambda"], o2.store[name].extras["Lambda"]
            assert not torch.allclose(lam1, torch.outer(o1.store[name].dG, o1.store[name].dA))
            torch.testing.assert_close(lam2, lam1, rtol=0, atol=1e-12)
    assert o2.preconditioner.skipped_steps == 0 and o2.preconditioner.discarded_statistics == 0


def test_update_with_an_empty_batch_keeps_the_factors():
    """``update()`` (no gradients touched) with a 0-row batch: no statistics, the factors are left as they are."""
    ref = _mlp(FLOAT64)
    runs = []
    for with_empty in (False, True):
        model = copy.deepcopy(ref)
        pre = kfac.KFACPreconditioner(model, factor_decay=0.5, factor_dtype=FLOAT64)
        batches = [_batch(0, FLOAT64), _batch(1, FLOAT64)]
        if with_empty:
            x, y = _batch(5, FLOAT64)
            batches.insert(1, (x[:0], y[:0]))
        for x, y in batches:
            model.zero_grad()
            before = {n: (pre.store[n].A, pre.store[n].G) for n in pre.layers}
            nn.functional.cross_entropy(model(x), y).backward()
            pre.update()
            if x.shape[0] == 0:
                for n in pre.layers:
                    assert torch.equal(pre.store[n].A, before[n][0]) and torch.equal(pre.store[n].G, before[n][1])
        assert pre.steps == len(batches)
        runs.append(pre)
    plain, with_empty = runs
    for n in plain.layers:
        e, f = plain.store[n], with_empty.store[n]
        assert torch.isfinite(f.A).all() and torch.isfinite(f.G).all()
        assert torch.equal(f.A, e.A) and torch.equal(f.G, e.G) and f.num_updates == e.num_updates == 2
    with_empty.refresh()
    out = with_empty.ihvp({n: torch.ones(s, dtype=FLOAT64) for n, s in with_empty.block_shapes().items()})
    assert all(torch.isfinite(v).all() for v in out.values())


# -- 6. clear errors for misuse ------------------------------------------------------------------------------------
def test_step_twice_without_backward_raises():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.zero_grad()
    _loss(model, 0).backward()
    opt.step()
    params = _params(model)
    with pytest.raises(RuntimeError, match="called again"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))  # nothing moved
    assert opt.preconditioner.steps == 1
    _train(model, opt, 1, start=1)  # a fresh backward works again
    assert opt.preconditioner.steps == 2


def test_building_kfac_twice_on_one_model_raises_until_removed():
    model = _mlp()
    opt1 = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already tracked"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(model[0]._forward_hooks) == 1  # the failed construction left no hooks behind
    opt1.preconditioner.remove()
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    opt2 = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, opt2, 2)
    assert opt2.preconditioner.steps == 2 and all(e.num_updates == 2 for _, e in opt2.store.items())
    assert all(e.num_updates == 0 for _, e in opt1.store.items())  # the removed one collected nothing


def test_replacing_a_tracked_module_raises_at_the_next_refresh():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), inv_update_steps=2)
    _train(model, opt, 1)
    model[2] = nn.Linear(6, 3)
    _train(model, opt, 1, start=1)  # step 1 is not a refresh step
    opt.zero_grad()
    _loss(model, 2).backward()
    with pytest.raises(RuntimeError, match="replaced") as info:
        opt.step()  # step 2 refreshes
    assert "'2'" in str(info.value)


def test_module_and_param_group_added_after_construction_warn():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), inv_update_steps=1)  # checked at refreshes
    _train(model, opt, 1)
    model.append(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="add_param_group"):
        opt.add_param_group({"params": list(model[3].parameters())})
    opt.zero_grad()
    _loss(model, 1).backward()
    raw = _gmat(model[3])
    with pytest.warns(UserWarning, match="added to the model after") as record:
        opt.step()
    assert any("'3'" in str(w.message) for w in record)
    assert torch.equal(_gmat(model[3]), raw)  # left unpreconditioned
    assert opt.preconditioner.layers == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        _train(model, opt, 1, start=2)


def test_skip_layers_that_match_nothing_warn_with_the_name():
    model = _mlp()
    with pytest.warns(UserWarning, match="nonexistent"):
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_layers=["nonexistent", "2"])
    assert opt.preconditioner.layers == ["0"]


def test_invalid_skip_layers_regex_raises():
    model = _mlp()
    with pytest.raises(ValueError, match="skip_layers"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), skip_layers=["("])
    assert not model[0]._forward_hooks


def test_meta_device_model_raises():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="meta"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_integer_comm_dtype_raises():
    model = _mlp()
    with pytest.raises(ValueError, match="comm_dtype"):
        kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), comm_dtype=torch.int8)


# -- 7. the state dict is local and resumes bit-identically -----------------------------------------------------------
def _same_structure(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _same_structure(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_structure(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _make(model):
    return kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), factor_update_steps=1,
                     inv_update_steps=2, damping=1e-2)


def test_state_dict_is_local_and_resumes_bit_identically():
    ref_model = _mlp()
    ref_opt = _make(ref_model)
    _train(ref_model, ref_opt, 7)

    model = _mlp()
    opt = _make(model)
    _train(model, opt, 3)  # stops in the middle of a refresh interval
    state = opt.state_dict()
    assert state["kfac"]["shard"] is None
    assert state["kfac"]["steps"] == 3
    consolidated = opt.consolidated_state_dict()
    _same_structure(consolidated, state)
    for n, entry in state["kfac"]["store"]["entries"].items():
        for k, t in entry["tensors"].items():  # referenced, not copied
            assert consolidated["kfac"]["store"]["entries"][n]["tensors"][k] is t
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": state}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    new_model = _mlp(seed=123)
    new_model.load_state_dict(saved["model"])
    new_opt = _make(new_model)
    new_opt.load_state_dict(saved["opt"])
    assert new_opt.preconditioner.steps == 3
    _train(new_model, new_opt, 4, start=3)
    assert all(torch.equal(p, q) for p, q in zip(new_model.parameters(), ref_model.parameters()))
    _same_structure(new_opt.state_dict()["kfac"], ref_opt.state_dict()["kfac"])


# -- 8. torch.compile ----------------------------------------------------------------------------------------------
def _compile_or_skip(model):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    try:
        importlib.import_module("torch._dynamo")
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"torch._dynamo is unavailable: {exc}")
    return torch.compile(model, backend="aot_eager")


@pytest.mark.parametrize("wrap", ["kfac-on-module", "kfac-on-compiled"])
def test_torch_compile_matches_eager(wrap):
    ref = _mlp()
    eager = copy.deepcopy(ref)
    eager_opt = kfac.KFAC(eager, torch.optim.SGD(eager.parameters(), lr=0.1), damping=1e-2)
    _train(eager, eager_opt, 3)

    model = copy.deepcopy(ref)
    compiled = _compile_or_skip(model)
    opt = kfac.KFAC(model if wrap == "kfac-on-module" else compiled, torch.optim.SGD(model.parameters(), lr=0.1),
                    damping=1e-2)
    pre = opt.preconditioner
    assert len(pre.layers) == 2
    try:
        _train(compiled, opt, 3)
    except Exception as exc:  # pragma: no cover (a backend that cannot run here)
        if "dynamo" in type(exc).__module__ or "inductor" in type(exc).__module__:
            pytest.skip(f"torch.compile cannot run here: {exc}")
        raise
    assert pre.unused_layers == [] and all(e.num_updates == 3 for _, e in opt.store.items())
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


# -- 9. activation checkpointing -------------------------------------------------------------------------------------
class _Checkpointed(nn.Module):
    def __init__(self, mode: bool | None) -> None:
        super().__init__()
        self.mode = mode  # None: no checkpointing; otherwise use_reentrant
        self.fc = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        if self.mode is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode)
        return self.head(torch.tanh(h))


def _checkpoint_run(mode, steps=3, method="eigen", fisher="empirical"):
    torch.manual_seed(0)
    model = _Checkpointed(mode).double()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), damping=1e-2, factor_dtype=FLOAT64,
                    inv_update_steps=2, method=method, fisher=fisher)
    generator = torch.Generator().manual_seed(3)
    for i in range(steps):
        x, y = _batch(i, FLOAT64)
        x.requires_grad_(mode is True)  # use_reentrant=True needs an input requiring grad to backpropagate
        opt.zero_grad()
        out = model(x)
        if fisher == "mc":
            opt.preconditioner.mc_backward(out, generator=generator)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("use_reentrant,method,fisher", [
    (False, "eigen", "empirical"), (True, "eigen", "empirical"), (False, "ekfac", "empirical"),
    (True, "ekfac", "empirical"), (False, "eigen", "mc")])  # torch's reentrant checkpointing refuses autograd.grad
def test_activation_checkpointing_matches_plain_run(use_reentrant, method, fisher):
    """Also with sampled labels (``fisher="mc"``): their backward reaches a checkpointed layer through the output
    its forward hook recorded."""
    ref_model, ref_opt = _checkpoint_run(None, method=method, fisher=fisher)
    model, opt = _checkpoint_run(use_reentrant, method=method, fisher=fisher)
    assert opt.preconditioner.layers == ["fc", "block.0", "block.2", "head"]
    assert opt.preconditioner.unused_layers == []
    for name in opt.preconditioner.layers:
        e, f = ref_opt.store[name], opt.store[name]
        assert f.num_updates == e.num_updates == 3, name
        torch.testing.assert_close(f.A, e.A, rtol=0, atol=1e-12)
        torch.testing.assert_close(f.G, e.G, rtol=0, atol=1e-12)
        if method == "ekfac":  # step 1 applied a correction, step 2 refreshed
            assert "Lambda" in f.extras
            torch.testing.assert_close(f.extras["Lambda"], e.extras["Lambda"], rtol=0, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("use_reentrant", [pytest.param(False, id="non-reentrant"), pytest.param(True, id="reentrant")])
def test_activation_checkpointing_logs_no_accumulation_warning(use_reentrant, kfac_caplog):
    _checkpoint_run(use_reentrant, steps=2)
    warnings_logged = [r.getMessage() for r in kfac_caplog.records
                       if r.name == "kfac" and r.levelno >= logging.WARNING]
    assert warnings_logged == []
