"""kfac.KFAC wrapper and KFACPreconditioner API: optimizer protocol, schedulers, kl_clip, hyperparameter
schedules, state_dict resume, layer registration/skipping, hook removal, zero_grad and GradScaler."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import kfac

from helpers import batch as _batch, mlp as _mlp, single_thread  # noqa: F401  (autouse fixture)
from helpers import grad_matrix as _raw_grad_matrix, loss as _loss, params as _params, train as _train

FLOAT64 = torch.float64


# -- optimizer protocol ------------------------------------------------------------------------------------------
def test_kfac_is_an_optimizer_sharing_base_state():
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = kfac.KFAC(model, base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.store is opt.preconditioner.store
    assert opt.preconditioner.layers == ["0", "2"]
    _train(model, opt, 2)
    assert set(opt.state) == set(model.parameters())  # momentum buffers live in the shared state
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"] is base.state[p]["momentum_buffer"]


def test_add_param_group_goes_to_base():
    model = _mlp()
    extra = nn.Parameter(torch.zeros(3))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = kfac.KFAC(model, base)
    with pytest.warns(UserWarning, match="not preconditioned"):
        opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(base.param_groups) == 2 and base.param_groups[1]["params"] == [extra]
    assert opt.param_groups is base.param_groups


def test_step_returns_closure_loss():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.preconditioner.steps == 1


@pytest.mark.parametrize("kind", ["step", "lambda"])
def test_lr_scheduler_changes_base_lr(kind):
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = kfac.KFAC(model, base)
    if kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        expected = [0.1, 0.05, 0.025]
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (e + 1))
        expected = [0.1, 0.05, 0.1 / 3]
    for i, lr in enumerate(expected):
        assert base.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
        _train(model, opt, 1, start=i)
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(expected[-1] * (0.5 if kind == "step" else 0.75), rel=1e-15)


# -- kl_clip uses the current lr -------------------------------------------------------------------------------
def _kl_pair(kl_clip, lr_now):
    """Two identical float64 runs (kl_clip=None and kl_clip); step 0 at lr 0 (no movement, nu=1), then a
    LambdaLR step to ``lr_now``; returns raw grads and the preconditioned grads of both runs at step 1."""
    out = []
    model0 = _mlp(FLOAT64)
    for clip in (None, kl_clip):
        model = copy.deepcopy(model0)
        opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), kl_clip=clip, damping=1e-2,
                        factor_dtype=FLOAT64)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0 if e == 0 else lr_now)
        _train(model, opt, 1, dtype=FLOAT64)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model0.parameters()))  # lr 0
        sched.step()
        assert opt.param_groups[0]["lr"] == lr_now
        opt.zero_grad()
        _loss(model, 1, FLOAT64).backward()
        raw = [_raw_grad_matrix(model[0]), _raw_grad_matrix(model[2])]
        opt.step()
        pre = [_raw_grad_matrix(model[0]), _raw_grad_matrix(model[2])]
        out.append((raw, pre))
    (raw_a, pre_a), (raw_b, pre_b) = out
    for r, s in zip(raw_a, raw_b):
        assert torch.equal(r, s)  # same state in both runs
    return raw_a, pre_a, pre_b


@pytest.mark.parametrize("lr_now", [0.3, 0.05])
def test_kl_clip_uses_current_lr(lr_now):
    kl_clip = 1e-5
    raw, pg, clipped = _kl_pair(kl_clip, lr_now)
    vg = sum(lr_now**2 * (v * g).sum() for v, g in zip(pg, raw))
    nu = min(1.0, math.sqrt(kl_clip / abs(float(vg))))
    assert nu < 0.5  # the clip is active, so the comparison below is discriminative
    # with the initial lr (0) there would be no clipping at all
    for v, c in zip(pg, clipped):
        torch.testing.assert_close(c, nu * v, rtol=1e-12, atol=0)


def test_kl_clip_inactive_when_large():
    raw, pg, clipped = _kl_pair(1e6, 0.1)
    for v, c in zip(pg, clipped):
        assert torch.equal(v, c)


def test_kl_clip_uses_per_group_lr():
    kl_clip, lrs = 1e-5, (0.2, 0.03)
    model0 = _mlp(FLOAT64)
    res = []
    for clip in (None, kl_clip):
        model = copy.deepcopy(model0)
        base = torch.optim.SGD([{"params": model[0].parameters(), "lr": lrs[0]},
                                {"params": model[2].parameters(), "lr": lrs[1]}], lr=1.0)
        opt = kfac.KFAC(model, base, kl_clip=clip, damping=1e-2, factor_dtype=FLOAT64)
        opt.zero_grad()
        _loss(model, 0, FLOAT64).backward()
        raw = [_raw_grad_matrix(model[0]), _raw_grad_matrix(model[2])]
        opt.step()
        res.append((raw, [_raw_grad_matrix(model[0]), _raw_grad_matrix(model[2])]))
    (raw, pg), (_, clipped) = res
    vg = sum(lr**2 * (v * g).sum() for lr, v, g in zip(lrs, pg, raw))
    nu = min(1.0, math.sqrt(kl_clip / abs(float(vg))))
    assert nu < 0.5
    for v, c in zip(pg, clipped):
        torch.testing.assert_close(c, nu * v, rtol=1e-12, atol=0)


def test_preconditioner_lr_override_in_step():
    """KFACPreconditioner.step(lr=...) overrides the lr hyperparameter for kl_clip (float and per-layer map)."""
    kl_clip = 1e-5
    model0 = _mlp(FLOAT64)
    results = {}
    for key, clip, lr_arg in [("none", None, None), ("float", kl_clip, 0.2), ("map", kl_clip, {"0": 0.2, "2": 0.05}),
                              ("callable", kl_clip, None)]:
        model = copy.deepcopy(model0)
        pre = kfac.KFACPreconditioner(model, kl_clip=clip, damping=1e-2, factor_dtype=FLOAT64,
                                      lr=(lambda s: 0.2) if key == "callable" else 123.0)
        model.zero_grad()
        _loss(model, 0, FLOAT64).backward()
        raw = [_raw_grad_matrix(model[0]), _raw_grad_matrix(model[2])]
        pre.step(lr=lr_arg)
        results[key] = (raw, [_raw_grad_matrix(model[0]), _raw_grad_matrix(model[2])])
    raw, pg = results["none"]
    for key, lrs in [("float", (0.2, 0.2)), ("map", (0.2, 0.05)), ("callable", (0.2, 0.2))]:
        vg = sum(lr**2 * (v * g).sum() for lr, v, g in zip(lrs, pg, raw))
        nu = min(1.0, math.sqrt(kl_clip / abs(float(vg))))
        assert nu < 0.5
        for v, c in zip(pg, results[key][1]):
            torch.testing.assert_close(c, nu * v, rtol=1e-12, atol=0)


# -- hyperparameter schedules --------------------------------------------------------------------------------
def test_callable_hyperparameters_follow_schedule():
    calls: dict[str, list[tuple[int, int | None]]] = {"damping": [], "fus": [], "ius": [], "decay": [], "kl": []}
    current: list[int | None] = [None]  # the training-loop step being executed (None during construction)

    def rec(key, fn):
        def wrapped(step):
            calls[key].append((step, current[0]))
            return fn(step)
        return wrapped

    def fus(s):
        return 1 if s < 3 else 3

    def ius(s):
        return 2 if s < 4 else 5

    def damping(s):
        return 1e-2 * (s + 1)

    model = _mlp(FLOAT64)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_update_steps=rec("fus", fus),
                    inv_update_steps=rec("ius", ius), damping=rec("damping", damping),
                    factor_decay=rec("decay", lambda s: 0.9), kl_clip=rec("kl", lambda s: 1.0),
                    factor_dtype=FLOAT64)
    pre = opt.preconditioner
    n_steps = 12
    expected_updates = [s for s in range(n_steps) if s % fus(s) == 0]
    expected_refresh = [s for s in range(n_steps) if s % ius(s) == 0]
    assert expected_updates == [0, 1, 2, 3, 6, 9] and expected_refresh == [0, 2, 5, 10]

    seen_updates, seen_refresh = [], []
    prev_qg = {n: None for n in pre.layers}
    for s in range(n_steps):
        current[0] = s
        opt.zero_grad()
        _loss(model, s, FLOAT64).backward()
        raw = _raw_grad_matrix(model[2])
        before = {n: opt.store[n].num_updates for n in pre.layers}
        opt.step()
        assert pre.steps == s + 1
        after = {n: opt.store[n].num_updates for n in pre.layers}
        deltas = {after[n] - before[n] for n in pre.layers}
        assert deltas in ({0}, {1})
        if deltas == {1}:
            seen_updates.append(s)
        refreshed = {opt.store[n].QG is not prev_qg[n] for n in pre.layers}
        assert len(refreshed) == 1
        if refreshed.pop():
            seen_refresh.append(s)
        prev_qg = {n: opt.store[n].QG for n in pre.layers}
        # the damping used at this step is damping(s): P(g) = QG [(QG^T g QA) / (dG dA^T + damping)] QA^T
        e = opt.store["2"]
        v = e.QG @ ((e.QG.T @ raw @ e.QA) / (torch.outer(e.dG, e.dA) + damping(s))) @ e.QA.T
        torch.testing.assert_close(_raw_grad_matrix(model[2]), v, rtol=1e-10, atol=1e-14)

    assert seen_updates == expected_updates
    assert seen_refresh == expected_refresh
    assert all(opt.store[n].num_updates == len(expected_updates) for n in pre.layers)
    # every call made while executing step s received s as its argument
    for key, recorded in calls.items():
        assert recorded, key
        assert all(arg == cur for arg, cur in recorded if cur is not None), (key, recorded)
        assert {arg for arg, cur in recorded if cur is not None} == set(range(n_steps)), key
        assert all(arg == 0 for arg, cur in recorded if cur is None), key  # construction-time validation


def test_factor_decay_schedule_is_applied():
    """A = decay(s) * A + (1 - decay(s)) * A_batch with the running factor initialised to the identity."""
    model = _mlp(FLOAT64)
    decays = {0: 0.5, 1: 0.25}
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.0), factor_decay=lambda s: decays.get(s, 0.1),
                    factor_dtype=FLOAT64, kl_clip=None)
    A = torch.eye(5, dtype=FLOAT64)
    for s in range(2):
        opt.zero_grad()
        x, y = _batch(s, FLOAT64)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=FLOAT64)], dim=1)
        A = decays[s] * A + (1 - decays[s]) * (a.T @ a / x.shape[0])
        torch.testing.assert_close(opt.store["0"].A, A, rtol=1e-13, atol=1e-15)


# -- state_dict resume ---------------------------------------------------------------------------------------
def _make(method, base_kind, model=None):
    model = model if model is not None else _mlp()
    if base_kind == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = kfac.KFAC(model, base, method=method, factor_update_steps=2, inv_update_steps=3, damping=1e-2,
                    kl_clip=1e-3)
    return model, opt


@pytest.mark.parametrize("n_first", [4, 5])
@pytest.mark.parametrize("base_kind", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_state_dict_resume_is_bit_identical(method, base_kind, n_first):
    n_more = 6
    model_ref, opt_ref = _make(method, base_kind)
    _train(model_ref, opt_ref, n_first + n_more)

    model, opt = _make(method, base_kind)
    _train(model, opt, n_first)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    buf.seek(0)
    ckpt_safe = torch.load(buf, weights_only=True)  # plain containers and tensors only: safe loading works
    assert ckpt_safe["opt"]["kfac"]["steps"] == n_first

    for state in (ckpt, ckpt_safe):
        model2, opt2 = _make(method, base_kind, model=_mlp(seed=123))  # different init: all comes from state
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["opt"])
        assert opt2.preconditioner.steps == n_first
        assert opt2.param_groups is opt2.optimizer.param_groups and opt2.state is opt2.optimizer.state
        _train(model2, opt2, n_more, start=n_first)
        for p, q in zip(model2.parameters(), model_ref.parameters()):
            assert torch.equal(p, q)
        for name in opt_ref.preconditioner.layers:
            e, f = opt2.store[name], opt_ref.store[name]
            assert e.num_updates == f.num_updates
            assert torch.equal(e.A, f.A) and torch.equal(e.G, f.G)


def test_kfac_load_state_dict_requires_kfac_entry():
    model, opt = _make("eigen", "sgd")
    with pytest.raises(ValueError, match="kfac"):
        opt.load_state_dict(opt.optimizer.state_dict())


def test_load_state_dict_method_mismatch():
    model, opt = _make("eigen", "sgd")
    _train(model, opt, 1)
    _, opt2 = _make("inverse", "sgd", model=copy.deepcopy(model))
    with pytest.raises(ValueError, match="method"):
        opt2.load_state_dict(opt.state_dict())


# -- registration and skipping -------------------------------------------------------------------------------
class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c1d = nn.LSTM(2, 2)  # recurrent: not supported
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)))
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)


def test_layers_and_skipped_reasons():
    pre = kfac.KFACPreconditioner(_Zoo())
    assert pre.layers == ["conv", "bn", "gconv", "block.0", "block.2.0", "emb", "fc"]
    assert set(pre.store) == set(pre.layers)
    skipped = dict(pre.skipped)
    assert set(skipped) == {"c1d"}
    assert "LSTM" in skipped["c1d"]
    assert pre.store["bn"].a_diagonal and (pre.store["bn"].a_dim, pre.store["bn"].g_dim) == (8, 1)
    assert pre.store["emb"].a_diagonal and (pre.store["emb"].a_dim, pre.store["emb"].g_dim) == (10, 4)
    assert (pre.store["conv"].a_dim, pre.store["conv"].g_dim) == (2 * 9 + 1, 4)


@pytest.mark.parametrize("skip, expected_layers, expected_skipped", [
    (["fc"], ["conv", "bn", "gconv", "block.0", "block.2.0", "emb"], {"fc"}),
    ("fc", ["conv", "bn", "gconv", "block.0", "block.2.0", "emb"], {"fc"}),  # a single string
    (["Linear"], ["conv", "bn", "gconv", "emb"], {"block.0", "block.2.0", "fc"}),
    ([r"block\.\d+(\.0)?"], ["conv", "bn", "gconv", "emb", "fc"], {"block.0", "block.1", "block.2", "block.2.0"}),  # ReLU too
    (["block"], ["conv", "bn", "gconv", "emb", "fc"], {"block", "block.0", "block.2.0"}),
    (["block.2", "Embedding"], ["conv", "bn", "gconv", "block.0", "fc"], {"block.2", "block.2.0", "emb"}),
])
def test_skip_layers(skip, expected_layers, expected_skipped):
    pre = kfac.KFACPreconditioner(_Zoo(), skip_layers=skip)
    assert pre.layers == expected_layers
    skipped = dict(pre.skipped)
    assert set(skipped) - {"bn", "gconv", "c1d"} == expected_skipped
    assert set(pre.store) == set(expected_layers)


def test_skipping_parent_skips_children_with_reason():
    pre = kfac.KFACPreconditioner(_Zoo(), skip_layers=["block"])
    skipped = dict(pre.skipped)
    assert skipped["block"] == "matched skip_layers"
    assert "block" in skipped["block.0"] and "parent" in skipped["block.0"]
    assert "block" in skipped["block.2.0"] and "parent" in skipped["block.2.0"]
    # the hooks of skipped modules are not registered
    model = _Zoo()
    kfac.KFACPreconditioner(model, skip_layers=["block"])
    assert not model.block[0]._forward_hooks and not model.block[2][0]._forward_hooks
    assert len(model.fc._forward_hooks) == 1


def test_skip_everything_raises():
    with pytest.raises(ValueError, match="no supported layers"):
        kfac.KFACPreconditioner(_Zoo(), skip_layers=[".*"])


def test_skipping_root_module_by_class_name_skips_everything():
    with pytest.raises(ValueError, match="no supported layers"):
        kfac.KFACPreconditioner(_Zoo(), skip_layers=["_Zoo"])


def test_frozen_and_shared_layers_are_skipped():
    lin = nn.Linear(3, 3)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    model = nn.Sequential(lin, nn.Tanh(), lin, frozen, nn.Linear(3, 2))
    pre = kfac.KFACPreconditioner(model)
    # named_modules() deduplicates the shared module, so index 2 is not visited
    assert pre.layers == ["0", "4"]
    assert "frozen" in dict(pre.skipped)["3"]


def test_remove_removes_all_hooks():
    model = _mlp(FLOAT64)
    pre = kfac.KFACPreconditioner(model, factor_dtype=FLOAT64)
    assert all(len(model[i]._forward_hooks) == 1 for i in (0, 2))
    model.zero_grad()
    _loss(model, 0, FLOAT64).backward()
    pre.step()
    A = {n: pre.store[n].A.clone() for n in pre.layers}
    pre.remove()
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.zero_grad()
    _loss(model, 1, FLOAT64).backward()
    assert all(layer.a_sum is None and layer.g_sum is None and layer.a_count == 0 for layer in pre._layers)
    pre.step()  # a factor step (factor_update_steps=1), but nothing was collected
    assert all(torch.equal(pre.store[n].A, A[n]) and pre.store[n].num_updates == 1 for n in pre.layers)


def test_remove_between_forward_and_backward_collects_nothing():
    model = _mlp()
    pre = kfac.KFACPreconditioner(model)
    loss = _loss(model, 0)
    pre.remove()
    loss.backward()
    assert all(layer.g_sum is None and layer.g_count == 0 for layer in pre._layers)


# -- zero_grad -----------------------------------------------------------------------------------------------
def test_zero_grad_delegates_and_drops_pending_statistics():
    model = _mlp(FLOAT64)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_decay=0.5, factor_dtype=FLOAT64)
    _loss(model, 0, FLOAT64).backward()  # an abandoned step
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(layer.a_sum is None and layer.g_sum is None for layer in opt.preconditioner._layers)

    x, y = _batch(1, FLOAT64)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    a = torch.cat([x, torch.ones(len(x), 1, dtype=FLOAT64)], dim=1)
    expected = 0.5 * torch.eye(5, dtype=FLOAT64) + 0.5 * a.T @ a / len(x)
    torch.testing.assert_close(opt.store["0"].A, expected, rtol=1e-13, atol=1e-15)
    assert opt.store["0"].num_updates == 1

    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_zero_grad_between_forward_and_backward_still_updates_factors():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for i in range(2):
        loss = _loss(model, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(opt.store[n].num_updates == 2 for n in opt.preconditioner.layers)


# -- GradScaler ----------------------------------------------------------------------------------------------
def _cpu_grad_scaler(init_scale):
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available in this torch")
    try:
        return torch.amp.GradScaler("cpu", init_scale=init_scale)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not usable here: {exc}")


@pytest.mark.parametrize("dtype", [torch.float32, FLOAT64])
def test_grad_scaler_matches_unscaled_run(dtype):
    scaler = _cpu_grad_scaler(2.0**10)
    model_ref = _mlp(dtype)
    model = copy.deepcopy(model_ref)
    kw = dict(factor_decay=0.9, damping=1e-2, factor_dtype=dtype)
    opt_ref = kfac.KFAC(model_ref, torch.optim.SGD(model_ref.parameters(), lr=0.1, momentum=0.9), **kw)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), grad_scaler=scaler, **kw)
    ref_batches = [0, 1, 3, 4]  # batch 2 produces an inf loss in the scaled run and is skipped there
    for i in ref_batches:
        opt_ref.zero_grad()
        _loss(model_ref, i, dtype).backward()
        opt_ref.step()
    for i in range(5):
        opt.zero_grad()
        loss = _loss(model, i, dtype)
        if i == 2:
            loss = loss * float("inf")
            before = ({n: (opt.store[n].A.clone(), opt.store[n].G.clone()) for n in opt.preconditioner.layers},
                      _params(model), opt.preconditioner.steps)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert scaler.get_scale() == 2.0**9
            assert opt.preconditioner.steps == before[2]
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
            for n, (A, G) in before[0].items():
                assert torch.equal(opt.store[n].A, A) and torch.equal(opt.store[n].G, G)
    assert opt.preconditioner.steps == opt_ref.preconditioner.steps == 4
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for n in opt.preconditioner.layers:
        assert opt.store[n].num_updates == 4
        torch.testing.assert_close(opt.store[n].A, opt_ref.store[n].A, **tol)
        torch.testing.assert_close(opt.store[n].G, opt_ref.store[n].G, **tol)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_inf_gradient_direct_step_is_skipped():
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = kfac.KFAC(model, base)
    _train(model, opt, 2)
    pre = opt.preconditioner
    snap = ({n: (opt.store[n].A.clone(), opt.store[n].G.clone(), opt.store[n].QG.clone(), opt.store[n].num_updates)
             for n in pre.layers}, _params(model), {p: base.state[p]["momentum_buffer"].clone() for p in
                                                   model.parameters()})
    handle = model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    opt.zero_grad()
    _loss(model, 5).backward()
    handle.remove()
    opt.step()
    assert pre.skipped_steps == 1 and pre.steps == 2
    for n, (A, G, QG, k) in snap[0].items():
        e = opt.store[n]
        assert torch.equal(e.A, A) and torch.equal(e.G, G) and torch.equal(e.QG, QG) and e.num_updates == k
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snap[1]))
    assert all(torch.equal(base.state[p]["momentum_buffer"], m) for p, m in snap[2].items())
    # training continues normally afterwards
    _train(model, opt, 1, start=6)
    assert pre.steps == 3 and pre.skipped_steps == 1


def test_base_optimizer_over_subset_of_parameters():
    model = _mlp()
    opt = kfac.KFAC(model, torch.optim.SGD(model[2].parameters(), lr=0.1))
    frozen = [p.detach().clone() for p in model[0].parameters()]
    _train(model, opt, 2)
    assert opt.preconditioner.steps == 2
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))


def test_in_memory_state_dict_is_a_consistent_snapshot():
    """Factors are never mutated in place, so a state dict kept in memory (no serialisation) still resumes
    bit-identically after the original optimizer has trained on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), factor_update_steps=1, inv_update_steps=2)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(6)]

    def run(m, o, batches):
        for x, y in batches:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    run(model, opt, data[:3])
    snapshot = copy.deepcopy(model.state_dict()), opt.state_dict()
    a_before = snapshot[1]["kfac"]["store"]["entries"]["0"]["tensors"]["A"].clone()
    run(model, opt, data[3:])
    assert torch.equal(snapshot[1]["kfac"]["store"]["entries"]["0"]["tensors"]["A"], a_before)

    fresh = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    fresh.load_state_dict(snapshot[0])
    fresh_opt = kfac.KFAC(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), factor_update_steps=1,
                          inv_update_steps=2)
    fresh_opt.load_state_dict(snapshot[1])
    run(fresh, fresh_opt, data[3:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_autocast_forward_keeps_factors_in_factor_dtype(method):
    """Under autocast (bfloat16 on CPU here; the same on CUDA) the hooks compute statistics in factor_dtype from
    the low-precision activations, and the step works (it used to fail with a dtype mismatch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), method=method, inv_update_steps=2,
                    factor_decay=0.0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()
    for name in opt.preconditioner.layers:
        e = opt.store[name]
        assert e.A.dtype == e.G.dtype == e.QA.dtype == torch.float32
    a = torch.cat([x, torch.ones(16, 1)], 1)  # the first layer's input (autocast casts inside the layer)
    torch.testing.assert_close(opt.store["0"].A, a.T @ a / 16, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cached_eigen_scaling_follows_damping_and_refresh():
    """The PyTorch path caches 1 / (eigenvalues + damping): it must follow damping changes and new decompositions
    (each product equals the dense (A (x) G + damping I)^-1 solve)."""
    model = _mlp(FLOAT64)
    pre = kfac.KFACPreconditioner(model, damping=0.1, kl_clip=None, factor_decay=0.5, factor_dtype=FLOAT64)
    g = torch.Generator().manual_seed(5)

    def check(damping):
        grads = {n: torch.randn(s, generator=g, dtype=FLOAT64) for n, s in pre.block_shapes().items()}
        with kfac.ext.backend("torch"):
            out = pre.ihvp(grads, damping=damping)
        for name, v in grads.items():
            e = pre.store[name]
            dense = torch.kron(e.A, e.G) + damping * torch.eye(e.A.shape[0] * e.G.shape[0], dtype=FLOAT64)
            want = torch.linalg.solve(dense, v.T.reshape(-1)).reshape(v.shape[1], v.shape[0]).T
            torch.testing.assert_close(out[name], want, rtol=1e-9, atol=1e-12)

    for step in range(2):
        _loss(model, step, FLOAT64).backward()
        pre.update()
        pre.refresh()
        for damping in (0.1, 0.01, 0.1):
            check(damping)
        model.zero_grad()


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_dcp_state_initialisation_on_a_fresh_optimizer_steps_only_the_base_and_lays_out_kfac_placeholders(
        adaptive):
    """torch.distributed.checkpoint's get_optimizer_state_dict creates an empty optimizer's state by step() on
    all-zero gradients at lr 0, before any forward pass: no crash ("call model.train()"), K-FAC's state untouched,
    the state dict holds K-FAC's fixed-shape placeholders (absent, flagged 0) under each layer's weight, and
    training afterwards equals a run that never saw the call."""
    import json
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        base = torch.optim.SGD(model.parameters(), lr=1.0 if adaptive else 0.1, momentum=0.0 if adaptive else 0.9)
        return model, kfac.KFAC(model, base, adaptive=adaptive)

    def train(model, opt):
        for i in range(2):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            if adaptive:
                opt.step(lambda: nn.functional.cross_entropy(model(x), y))
            else:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    model, opt = build()
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"} and opt.preconditioner.steps == 0
    assert osd["state"]["0.weight"]["kfac.A"].shape == (5, 5) and osd["state"]["2.weight"]["kfac.QG"].shape == (3, 3)
    assert int(osd["state"]["0.weight"]["kfac.A.present"]) == 0 and int(osd["state"]["0.weight"]["kfac.num_updates"]) == 0
    assert json.loads(osd["param_groups"][0]["kfac"])["steps"] == 0
    assert all(opt.preconditioner.store[n].A is None for n in opt.preconditioner.layers)
    assert all(g["lr"] == (1.0 if adaptive else 0.1) for g in opt.param_groups)  # DCP restored it
    train(model, opt)
    reference, ref_opt = build()
    train(reference, ref_opt)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
