"""``solver="ggn"`` / ``"hessian"``: the preconditioned query gradients equal the dense float64 solve
``(K + D)^-1 grad f(q)``, with ``K`` the exact Gauss-Newton matrix or Hessian of the mean training loss over the
tracked layers' parameters (``torch.autograd.functional`` on a flat parameter vector) and ``D`` each layer's damping, on an MLP, a CNN with GroupNorm and a transformer
encoder in both ``batch_first`` layouts; zero iterations reproduce the direct map, and the identity gives plain CG; two gloo ranks equal one
process; negative curvature and missing training data are handled as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import float64_default, single_thread  # noqa: F401
from kfac.influence import ClassificationTask, InfluenceAnalyzer, Task

pytestmark = pytest.mark.usefixtures("float64_default")
F64 = dict(factor_dtype=torch.float64, score_dtype=torch.float64, progress=False)


class Encoder(nn.Module):
    """Batch-first inputs (declared, as kfac reads layouts); the encoder layer runs in either layout."""

    batch_first = True

    def __init__(self, inner_batch_first: bool) -> None:
        super().__init__()
        self.inner = inner_batch_first
        self.embed = nn.Linear(5, 8)
        self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0,
                                                batch_first=inner_batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.layer(h if self.inner else h.transpose(0, 1))
        return self.head((h if self.inner else h.transpose(0, 1)).mean(1))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def problem(kind: str, n: int = 24):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(n, 4, generator=g)
    elif kind == "cnn":
        model, x = cnn(), torch.randn(n, 2, 5, 5, generator=g)
    else:
        model, x = Encoder(inner_batch_first=kind == "encoder"), torch.randn(n, 4, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]
    queries = [(x[:3] + 0.1, y[:3])]
    return model.eval(), train, queries


def tracked_parameters(model: nn.Module, layers: list[str]) -> list[tuple[str, str]]:
    """(layer, parameter name) of every parameter of the tracked layers, in a fixed order."""
    modules = dict(model.named_modules())
    out = []
    for layer in layers:
        m = modules[layer]
        names = ["in_proj_weight", "in_proj_bias"] if isinstance(m, nn.MultiheadAttention) else \
            [k for k, _ in m.named_parameters(recurse=False)]
        out += [(layer, f"{layer}.{k}" if layer else k) for k in names if getattr(m, k) is not None]
    return out


def dense_reference(model, train, queries, layers, damping, curvature="hessian"):
    """``grad f(q)^T (K + D)^-1 grad L(z_j)`` over the tracked parameters, all dense, float64: ``K`` the Hessian of
    the mean cross-entropy, or its Gauss-Newton matrix ``mean_n J_n^T (diag p_n - p_n p_n^T) J_n``; and the
    Hessian's eigenvalues."""
    named = tracked_parameters(model, layers)
    params = dict(model.named_parameters())
    shapes = [params[k].shape for _, k in named]
    theta = torch.cat([params[k].detach().flatten() for _, k in named])

    def unflat(v):
        out, o = {}, 0
        for (_, k), s in zip(named, shapes):
            out[k] = v[o:o + s.numel()].view(s)
            o += s.numel()
        return out

    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention kernel has no double backward
        hess = torch.autograd.functional.hessian(
            lambda v: F.cross_entropy(functional_call(model, unflat(v), (x,)), y), theta)
    curv = hess
    if curvature == "ggn":
        with sdpa_kernel([SDPBackend.MATH]):
            jac = torch.autograd.functional.jacobian(lambda v: functional_call(model, unflat(v), (x,)), theta)
        p = torch.softmax(model(x).detach(), -1)  # jac: (N, classes, params)
        out_hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        curv = torch.einsum("nip,nij,njq->pq", jac, out_hess, jac) / len(x)
    d = torch.cat([torch.full((s.numel(),), damping[layer]) for (layer, _), s in zip(named, shapes)])

    def grads(xs, ys):
        rows = []
        for xi, yi in zip(xs, ys):
            v = theta.clone().requires_grad_(True)
            loss = F.cross_entropy(functional_call(model, unflat(v), (xi[None],)), yi[None])
            rows.append(torch.autograd.grad(loss, v)[0])
        return torch.stack(rows)

    gq, gt = grads(*queries[0]), grads(x, y)
    return torch.linalg.solve(curv + torch.diag(d), gq.T).T @ gt.T, torch.linalg.eigvalsh(hess)


CASES = [(kind, "ekfac", curvature) for kind in ("mlp", "cnn", "encoder", "encoder-seq-first")
         for curvature in ("ggn", "hessian")] + [("mlp", "kfac", "hessian"), ("cnn", "kfac", "ggn")]


@pytest.mark.parametrize(("kind", "method", "curvature"), CASES)
def test_cg_equals_the_dense_damped_solve(kind, method, curvature):
    model, train, queries = problem(kind)
    layers = InfluenceAnalyzer(model, ClassificationTask(), **F64).layers
    _, eig = dense_reference(model, train, queries, layers, dict.fromkeys(layers, 1.0))
    damping = float(0.05 - eig.min().clamp(max=0))  # H + D positive definite (H at random weights is indefinite)
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, damping=damping, solver=curvature,
                           solver_iterations=200, solver_tolerance=1e-12, **F64).fit(train)
    got = an.pairwise_scores(queries, train)
    want, _ = dense_reference(model, train, queries, an.layers, an.damping, curvature)
    assert an.solver_info["stopped_negative"] == 0
    assert an.solver_info["relative_residual"].max() <= 1e-11
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    direct = InfluenceAnalyzer(model, ClassificationTask(), method=method, damping=damping, **F64).fit(train)
    assert (direct.pairwise_scores(queries, train) - want).norm() > 1e-3 * want.norm(), \
        "the direct map should differ from the exact solve here (else the test shows nothing)"


def test_zero_iterations_are_the_direct_map_and_identity_is_plain_cg():
    model, train, queries = problem("cnn")
    layers = InfluenceAnalyzer(model, ClassificationTask(), **F64).layers
    _, eig = dense_reference(model, train, queries, layers, dict.fromkeys(layers, 1.0))
    common = dict(damping=float(0.05 - eig.min().clamp(max=0)), **F64)
    direct = InfluenceAnalyzer(model, ClassificationTask(), **common).fit(train).pairwise_scores(queries, train)
    zero = InfluenceAnalyzer(model, ClassificationTask(), solver="ggn", solver_iterations=0, **common).fit(train)
    torch.testing.assert_close(zero.pairwise_scores(queries, train), direct, rtol=1e-12, atol=1e-14)
    plain = InfluenceAnalyzer(model, ClassificationTask(), method="identity", solver="hessian", solver_iterations=400,
                              solver_tolerance=1e-12, **common).fit(train)
    want, _ = dense_reference(model, train, queries, plain.layers, plain.damping)
    torch.testing.assert_close(plain.pairwise_scores(queries, train), want, rtol=1e-8, atol=1e-10)


def test_negative_curvature_keeps_the_direct_answer():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 4, generator=g) * 3, torch.randint(0, 3, (40,), generator=g)
    train = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    an = InfluenceAnalyzer(model, ClassificationTask(), damping=1e-6, solver="hessian", solver_iterations=100,
                           solver_tolerance=1e-12, **F64).fit(train)
    _, eig = dense_reference(model, train, [(x[:2], y[:2])], an.layers, an.damping)
    assert eig.min() < -1e-3, "the test needs an indefinite Hessian"
    queries = [(x[:3], y[:3]), (x[3:6], y[3:6])]  # two batches of queries: one report for the call
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        scores = an.pairwise_scores(queries, train)
    info = an.solver_info
    assert info["stopped_negative"] > 0 and info["relative_residual"].shape == (6,)
    direct = InfluenceAnalyzer(model, ClassificationTask(), damping=1e-6, **F64).fit(train)
    same = torch.isclose(scores, direct.pairwise_scores(queries, train), rtol=1e-10, atol=0).all(1)
    assert int(same.sum()) == info["stopped_negative"]  # exactly the stopped queries keep the direct answer


def test_bad_settings_and_missing_data_are_clear_errors(tmp_path):
    model, train, queries = problem("mlp")
    for bad in (dict(solver="lsqr"), dict(solver_iterations=-1), dict(solver_tolerance=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InfluenceAnalyzer(model, ClassificationTask(), **bad, **F64)
    an = InfluenceAnalyzer(model, ClassificationTask(), solver="ggn", damping=0.3, **F64).fit(train)
    want = an.pairwise_scores(queries, train)
    an.save(tmp_path / "fit")
    loaded = InfluenceAnalyzer.load(tmp_path / "fit", model, ClassificationTask(), progress=False)
    with pytest.raises(RuntimeError, match="use_curvature_data"):
        loaded.pairwise_scores(queries, train)
    torch.testing.assert_close(loaded.use_curvature_data(train).pairwise_scores(queries, train), want)

    class LossOnly(Task):  # no outputs() / output_loss(): the Gauss-Newton matrix is out of reach, the Hessian not
        def loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(NotImplementedError, match="solver='hessian'"):
        InfluenceAnalyzer(model, LossOnly(), solver="ggn", fisher="empirical", **F64).fit(train).pairwise_scores(
            queries, train)
    torch.testing.assert_close(InfluenceAnalyzer(model, LossOnly(), solver="hessian", method="identity", **F64)
                               .fit(train).pairwise_scores(queries, train), InfluenceAnalyzer(
        model, ClassificationTask(), solver="hessian", method="identity", **F64).fit(train).pairwise_scores(
        queries, train))


@pytest.mark.timeout(240)
def test_two_gloo_ranks_equal_one_process(tmp_path):
    import dist_workers as W

    W.launch(W.influence_cg, 2, tmp_path)
    got = torch.load(tmp_path / "influence_cg.pt")
    model, train, queries = W.influence_problem()
    an = InfluenceAnalyzer(model, ClassificationTask(), solver="ggn", damping=0.5, solver_iterations=60,
                           solver_tolerance=1e-13, **F64).fit(train)
    torch.testing.assert_close(got["scores"], an.pairwise_scores(queries, train), rtol=1e-9, atol=1e-12)
    assert got["iterations"] == an.solver_info["iterations"]
