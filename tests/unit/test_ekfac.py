"""EK-FAC against dense float64 references, and the curvature interface (ihvp/diag) of every K-FAC method.

Conventions as in test_math.py: V is (d_out, d_in + 1) with the bias last; vec is column-major, so the Kronecker
eigenbasis is kron(QA, QG) and a (g_dim, a_dim) eigenvalue matrix L enters as diag(vec(L)). The "exact" empirical
Fisher block of a layer is (1/N) sum_n vec(V_n) vec(V_n)^T with V_n example n's share of the gradient of the
batch-mean loss (torch.func per-example gradients divided by N): the quantity A (x) G approximates.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
from helpers import float64_default, single_thread  # noqa: F401

EXACT = dict(factor_decay=0.0, correction_decay=0.0, kl_clip=None, factor_dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("float64_default")


def vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def per_example_matrices(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: (N, d_out, d_in + 1)} per-example shares of the batch-mean cross-entropy gradient."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    n = x.shape[0]
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = g[f"{name}.weight"].reshape(n, m.out_features, -1)
            out[name] = torch.cat([w, g[f"{name}.bias"][..., None]], 2) / n
    return out


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "ekfac", passes: int = 2,
        **kw) -> kfac.KFACPreconditioner:
    """Factors from the batch (pass 1), eigenbases, then corrections from the same batch (pass 2)."""
    pre = kfac.KFACPreconditioner(model, method=method, **{**EXACT, **kw})
    for i in range(passes):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.update()
        if i == 0:
            pre.refresh(damping=1e-3)
    return pre


def dense_eigen(entry: kfac.FactorEntry, eigenvalues: torch.Tensor) -> torch.Tensor:
    q = torch.kron(entry.QA, entry.QG)
    return q @ torch.diag(vec(eigenvalues)) @ q.T


def test_before_any_correction_ekfac_is_eigen_kfac():
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    ek = fit(mlp(), x, y, passes=1)
    eig = fit(mlp(), x, y, method="eigen", passes=1)
    v = {n: torch.randn(*s) for n, s in ek.block_shapes().items()}
    for name in ek.layers:
        e = ek.store[name]
        torch.testing.assert_close(e.extras["Lambda"], torch.outer(e.dG, e.dA))
    for name, got in ek.ihvp(v, damping=0.01).items():
        torch.testing.assert_close(got, eig.ihvp(v, damping=0.01)[name], rtol=1e-12, atol=0)


def test_corrections_are_the_exact_fisher_diagonal_in_the_eigenbasis_and_beat_kfac():
    """Lambda = diag(Q^T F Q) for Q = QA (x) QG (George et al.: the best diagonal in that basis), so EK-FAC is
    closer to the exact empirical Fisher block than K-FAC in Frobenius norm, for every layer."""
    model = mlp()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    pre = fit(model, x, y)
    per_example = per_example_matrices(mlp(), x, y)
    for name in pre.layers:
        e = pre.store[name]
        vs = torch.stack([vec(v) for v in per_example[name]])
        fisher = vs.T @ vs / vs.shape[0]
        q = torch.kron(e.QA, e.QG)
        torch.testing.assert_close(vec(e.extras["Lambda"]), torch.diagonal(q.T @ fisher @ q), rtol=1e-9, atol=1e-15)
        err_ekfac = torch.linalg.matrix_norm(fisher - dense_eigen(e, e.extras["Lambda"]))
        err_kfac = torch.linalg.matrix_norm(fisher - torch.kron(e.A, e.G))
        assert err_ekfac < err_kfac, (name, float(err_ekfac), float(err_kfac))  # K-FAC is diagonal in Q too


def test_ekfac_is_exact_for_one_data_point():
    model = mlp(1)
    x, y = torch.randn(1, 5), torch.randint(0, 3, (1,))
    pre = fit(model, x, y)
    per_example = per_example_matrices(mlp(1), x, y)
    for name in pre.layers:
        v = vec(per_example[name][0])
        e = pre.store[name]
        torch.testing.assert_close(dense_eigen(e, e.extras["Lambda"]), torch.outer(v, v), rtol=1e-8, atol=1e-13)


def test_sequence_inputs_sum_tokens_within_an_example():
    """(B, T, D) inputs: V_n = sum_t g_nt a_nt^T (the per-example gradient), Lambda = mean_n (Q^T V_n Q)^2 / T."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 7, 4), torch.randint(0, 3, (6, 7))

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, 3), target.reshape(-1))

    pre = kfac.KFACPreconditioner(model, method="ekfac", **EXACT)
    for i in range(2):
        model.zero_grad()
        loss_fn(model(x), y).backward()
        pre.update()
        if i == 0:
            pre.refresh()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: loss_fn(functional_call(model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x, y)
    n, t = x.shape[:2]
    for name in pre.layers:
        e = pre.store[name]
        v = torch.cat([g[f"{name}.weight"], g[f"{name}.bias"][..., None]], 2) / n  # share of the batch mean
        expected = (e.QG.T @ v @ e.QA).square().mean(0) / t
        torch.testing.assert_close(e.extras["Lambda"], expected, rtol=1e-9, atol=1e-16)


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_ihvp_and_diag_equal_the_dense_inverse(method):
    model = mlp(2)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    damping = 0.05
    pre = kfac.KFACPreconditioner(model, method=method, **EXACT)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.update()
        if i == 0:
            pre.refresh(damping=damping)
    v = {n: torch.randn(*s) for n, s in pre.block_shapes().items()}
    got, diag = pre.ihvp(v, damping=damping), pre.diag(damping=damping)
    for name in pre.layers:
        e = pre.store[name]
        eye = torch.eye(e.a_dim * e.g_dim)
        if method == "inverse":
            dense = torch.kron(torch.linalg.inv(e.A + damping * torch.eye(e.a_dim)),
                               torch.linalg.inv(e.G + damping * torch.eye(e.g_dim)))
        else:
            lam = e.extras["Lambda"] if method == "ekfac" else torch.outer(e.dG, e.dA)
            dense = torch.linalg.inv(dense_eigen(e, lam) + damping * eye)
        torch.testing.assert_close(vec(got[name]), dense @ vec(v[name]), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(vec(diag[name]), torch.diagonal(dense), rtol=1e-8, atol=1e-12)
    flat = kfac.curvature.flatten_blocks(v, pre.block_shapes())
    torch.testing.assert_close(pre.ihvp(flat, damping=damping), kfac.curvature.flatten_blocks(got, pre.block_shapes()))


def test_ihvp_bad_input_and_unfitted_state():
    model = mlp()
    pre = kfac.KFACPreconditioner(model, method="ekfac", **EXACT)
    shapes = pre.block_shapes()
    with pytest.raises(RuntimeError, match="no tracked layer ran forward"):
        pre.update()
    F.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    pre.update()
    with pytest.raises(RuntimeError, match="call update\\(\\) and refresh\\(\\) first"):
        pre.ihvp({n: torch.zeros(s) for n, s in shapes.items()})
    pre.refresh()
    with pytest.raises(ValueError, match="unknown layers"):
        pre.ihvp({"nope": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="expected"):
        pre.ihvp({"0": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="flat vector"):
        pre.ihvp(torch.zeros(3))
    with pytest.raises(ValueError, match="damping"):
        pre.ihvp({"0": torch.zeros(shapes["0"])}, damping=-1.0)
    inv = fit(mlp(), torch.randn(4, 5), torch.tensor([0, 1, 2, 0]), method="inverse", passes=1)
    zeros = {n: torch.zeros(s) for n, s in inv.block_shapes().items()}
    assert all(torch.equal(v, zeros[n]) for n, v in inv.ihvp(zeros, damping=1e-3).items())
    with pytest.raises(ValueError, match="bakes the damping"):
        inv.ihvp(zeros, damping=0.5)
    with pytest.raises(ValueError, match="correction_decay"):
        kfac.KFACPreconditioner(mlp(), method="ekfac", correction_decay=1.0)


def test_ekfac_optimizer_and_preconditioner_interface():
    model = mlp()
    opt = kfac.EKFAC(model, torch.optim.SGD(model.parameters(), lr=0.1), damping=0.01, factor_dtype=torch.float64)
    assert isinstance(opt.preconditioner, kfac.Preconditioner)
    assert opt.preconditioner.method.name == "ekfac"
    for i in range(3):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all("Lambda" in opt.store[n].extras for n in opt.preconditioner.layers)
    state = opt.state_dict()
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = kfac.EKFAC(model2, torch.optim.SGD(model2.parameters(), lr=0.1), damping=0.01,
                      factor_dtype=torch.float64)
    opt2.load_state_dict(state)
    for n in opt.preconditioner.layers:
        torch.testing.assert_close(opt2.store[n].extras["Lambda"], opt.store[n].extras["Lambda"])
    with pytest.raises(ValueError, match="method='ekfac'"):
        kfac.EKFAC(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), method="eigen")


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_batched_precondition_equals_one_matrix_at_a_time(method):
    """precondition() on a (b, g_dim, a_dim) batch (influence queries) equals the per-matrix map, including the
    block-structured path (A with decoupled coordinates, as zero-padded conv taps give)."""
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    x[:, 3:] = 0.0  # coordinates 3..7 only ever see zeros: exact 1x1 blocks of A
    a = x.T @ x / 40 + torch.diag(torch.arange(8.0) * 0.01)
    g = torch.randn(30, 5)
    entry = kfac.FactorEntry("l", a_dim=8, g_dim=5, A=a, G=g.T @ g / 30)
    m = kfac.kronecker.methods.make_method(method)
    m.refresh(entry, damping=0.1)
    if method == "ekfac":
        entry.extras["Lambda"] = torch.rand(5, 8) + 0.5
    v = torch.randn(4, 5, 8)
    batched = m.precondition(entry, v, damping=0.1)
    torch.testing.assert_close(batched, torch.stack([m.precondition(entry, vi, damping=0.1) for vi in v]))
    key = "A_inv" if method == "inverse" else "QA"
    assert entry.cache[key][1] is not None  # the structured path ran


def test_no_correction_warning_only_where_step_would_never_apply_one(kfac_caplog):
    """The curvature interface (update / refresh called directly) applies corrections: no warning; step() with
    corrections only on refresh steps applies none: warned once, at the first step()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    pre = kfac.KFACPreconditioner(model, method="ekfac", factor_decay=0.0, correction_decay=0.0, kl_clip=None)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    for fit_pass in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.update()
        if fit_pass == 0:
            pre.refresh()
    assert "Lambda" in pre.store["0"].extras and "never applies" not in kfac_caplog.text
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
    assert kfac_caplog.text.count("step() never applies a correction") == 1
