"""Influence scores against dense float64 references built from the same curvature (and from the exact Fisher).

score[q, j] = grad f(q)^T (C + damping I)^-1 grad L(z_j), per-example gradients from torch.func; vec is
column-major over (d_out, d_in + 1) gradient matrices, so kron(QA, QG) is the Kronecker eigenbasis.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
from helpers import float64_default, single_thread  # noqa: F401
from kfac.influence import ClassificationTask, InfluenceAnalyzer, Task

F64 = dict(factor_dtype=torch.float64, score_dtype=torch.float64, progress=False)


pytestmark = pytest.mark.usefixtures("float64_default")


def mlp(seed: int = 0, hidden: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def vec(m: torch.Tensor) -> torch.Tensor:
    return m.transpose(-1, -2).reshape(*m.shape[:-2], -1)


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: (N, d_out * (d_in + 1))} column-major vec of each example's loss gradient."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x, y)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = vec(torch.cat([g[f"{name}.weight"], g[f"{name}.bias"][..., None]], 2))
    return out


def dense_scores(inverses: dict[str, torch.Tensor], gq: dict, gt: dict) -> torch.Tensor:
    return sum(gq[n] @ inverses[n] @ gt[n].T for n in inverses)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_scores_equal_the_dense_curvature_built_from_the_same_factors(method):
    model = mlp()
    x, y = data(40)
    xq, yq = data(5, seed=2)
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, fisher="empirical", **F64)
    an.fit(batches(x, y, 16))
    scores = an.pairwise_scores(batches(xq, yq, 2), batches(x, y, 7))
    gq, gt = per_example(model, xq, yq), per_example(model, x, y)
    inverses = {}
    for name in an.layers:
        e = an.store[name]
        q = torch.kron(e.QA, e.QG)
        lam = e.extras["Lambda"]
        if method == "kfac":  # T = 1: Lambda are the Kronecker eigenvalues, i.e. C = A (x) G
            torch.testing.assert_close(q @ torch.diag(vec(lam)) @ q.T, torch.kron(e.A, e.G))
        else:  # Lambda = mean_n (QG^T V_n QA)^2 with the data's own labels
            torch.testing.assert_close(vec(lam), ((gt[name] @ q) ** 2).mean(0))
        dense = q @ torch.diag(vec(lam)) @ q.T
        inverses[name] = torch.linalg.inv(dense + an.damping[name] * torch.eye(dense.shape[0]))
        assert an.damping[name] == pytest.approx(0.1 * float(lam.mean()))
    torch.testing.assert_close(scores, dense_scores(inverses, gq, gt), rtol=1e-8, atol=1e-10)


class RecordingTask(ClassificationTask):
    """Samples labels from the model's predictive distribution and records them."""

    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []

    def sampled_loss(self, model, batch, generator):
        logits = model(batch[0])
        y = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator).squeeze(1)
        self.labels.append(y)
        return F.cross_entropy(logits, y, reduction="none")


def test_ekfac_lambda_uses_the_same_sampled_labels_as_the_factors():
    """lambda_labels="sampled" (kronfluence's convention): Lambda is the diagonal, in the Kronecker eigenbasis, of
    the Fisher whose A and G were fitted -- the per-example gradients at the labels sampled for the factors."""
    model = mlp()
    x, y = data(40)
    task = RecordingTask()
    an = InfluenceAnalyzer(model, task, method="ekfac", fisher="mc", lambda_labels="sampled", **F64).fit(
        batches(x, y, 16))
    assert len(task.labels) == 6  # three batches for the factors, the same three for Lambda
    for first, again in zip(task.labels[:3], task.labels[3:]):
        torch.testing.assert_close(first, again, rtol=0, atol=0)
    sampled = torch.cat(task.labels[:3])
    assert not torch.equal(sampled, y)
    g = per_example(model, x, sampled)
    for name in an.layers:
        e = an.store[name]
        q = torch.kron(e.QA, e.QG)
        torch.testing.assert_close(vec(e.extras["Lambda"]), ((g[name] @ q) ** 2).mean(0))


def test_identity_is_the_plain_gradient_dot_product():
    model = mlp()
    x, y = data(12)
    an = InfluenceAnalyzer(model, ClassificationTask(), method="identity", **F64).fit(batches(x, y, 5))
    g = per_example(model, x, y)
    want = sum(g[n] @ g[n].T for n in g)
    torch.testing.assert_close(an.pairwise_scores(batches(x, y, 4), batches(x, y, 5)), want)
    torch.testing.assert_close(an.self_scores(batches(x, y, 3)), torch.diagonal(want))


def test_mfac_equals_the_dense_window_fisher():
    model = mlp()
    x, y = data(30)
    m = 9
    an = InfluenceAnalyzer(model, ClassificationTask(), method="mfac", fisher="empirical", num_grads=m, **F64)
    an.fit(batches(x, y, 4))  # the first m examples' gradients, across batch boundaries
    g = per_example(model, x, y)
    full = torch.cat([g[n] for n in an.layers], 1)
    lam = an.damping[an.layers[0]]
    assert lam == pytest.approx(0.1 * float(full[:m].square().mean()))
    fisher = full[:m].T @ full[:m] / m + lam * torch.eye(full.shape[1])
    want = full[:5] @ torch.linalg.solve(fisher, full.T)
    torch.testing.assert_close(an.pairwise_scores(batches(x[:5], y[:5], 5), batches(x, y, 8)), want,
                               rtol=1e-8, atol=1e-10)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


def test_ekfac_tracks_the_exact_fisher_inverse_better_than_kfac():
    """Exact reference: the damped empirical Fisher over all tracked parameters (not block-diagonal)."""
    model = mlp(3, hidden=8)
    x, y = data(200, seed=5)
    xq, yq = data(8, seed=6)
    g = per_example(model, x, y)
    full = torch.cat([g[n] for n in g], 1)
    fisher = full.T @ full / full.shape[0]
    damping = 0.1 * float(torch.diagonal(fisher).mean())
    gq = per_example(model, xq, yq)
    exact = torch.cat([gq[n] for n in gq], 1) @ torch.linalg.solve(fisher + damping * torch.eye(len(fisher)), full.T)
    corr = {}
    for method in ("kfac", "ekfac"):
        an = InfluenceAnalyzer(model, ClassificationTask(), method=method, fisher="empirical", damping=damping,
                               **F64).fit(batches(x, y, 50))
        corr[method] = _spearman(an.pairwise_scores(batches(xq, yq, 8), batches(x, y, 50)), exact)
    assert corr["ekfac"] > 0.9, corr
    assert corr["ekfac"] > corr["kfac"], corr


def test_consistency_batching_low_rank_and_self_scores():
    model = mlp(hidden=5)
    x, y = data(30)
    an = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", **F64).fit(batches(x, y, 10))
    full = an.pairwise_scores(batches(x, y, 6), batches(x, y, 10))
    torch.testing.assert_close(an.pairwise_scores(batches(x, y, 30), batches(x, y, 1)), full)
    torch.testing.assert_close(torch.diagonal(full), an.self_scores(batches(x, y, 7)))
    per_layer = an.pairwise_scores(batches(x, y, 6), batches(x, y, 10), per_layer=True)
    assert set(per_layer) == {"0", "2"}
    torch.testing.assert_close(per_layer["0"] + per_layer["2"], full)
    low = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", query_rank=6, **F64)
    low._pre.store.load_state_dict(an.store.state_dict())
    low._fit = an._fit
    torch.testing.assert_close(low.pairwise_scores(batches(x, y, 6), batches(x, y, 10)), full)  # full rank
    low.args.query_rank = 1
    rank1 = low.pairwise_scores(batches(x, y, 6), batches(x, y, 10))
    assert not torch.allclose(rank1, full) and _spearman(rank1, full) > 0.5
    top = an.top_k(batches(x[:3], y[:3], 3), batches(x, y, 10), k=4)
    torch.testing.assert_close(top.scores, full[:3].topk(4, dim=1).values)
    assert torch.equal(top.indices, full[:3].topk(4, dim=1).indices)


@pytest.mark.parametrize("method", ["ekfac", "mfac"])
def test_save_load_round_trip_and_mismatch(method, tmp_path):
    model = mlp()
    x, y = data(20)
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, num_grads=8, **F64).fit(batches(x, y, 10))
    scores = an.pairwise_scores(batches(x[:4], y[:4], 4), batches(x, y, 10))
    an.save(tmp_path / "fit")
    again = InfluenceAnalyzer.load(tmp_path / "fit", model, ClassificationTask(), progress=False)
    # identical up to the memory layout of the loaded tensors (BLAS may sum in another order)
    torch.testing.assert_close(again.pairwise_scores(batches(x[:4], y[:4], 4), batches(x, y, 10)), scores,
                               rtol=1e-12, atol=1e-12)
    assert again.damping == an.damping
    with pytest.raises(ValueError, match="fitted for other layers"):
        InfluenceAnalyzer.load(tmp_path / "fit", mlp(hidden=7), ClassificationTask())
    with pytest.raises(kfac.FactorFileError, match="not a saved InfluenceAnalyzer"):
        InfluenceAnalyzer.load(tmp_path / "nothing", model, ClassificationTask())
    settings = tmp_path / "fit" / "influence.json"
    settings.write_text(settings.read_text()[:40])
    with pytest.raises(kfac.FactorFileError, match="unreadable"):
        InfluenceAnalyzer.load(tmp_path / "fit", model, ClassificationTask())


def test_factor_file_corruption_is_a_clear_error(tmp_path):
    model = mlp()
    x, y = data(12)
    an = InfluenceAnalyzer(model, ClassificationTask(), method="kfac", **F64).fit(batches(x, y, 6))
    an.save(tmp_path / "fit")
    factors = tmp_path / "fit" / "factors.safetensors"
    factors.write_bytes(factors.read_bytes()[:100])
    with pytest.raises(kfac.FactorFileError):
        InfluenceAnalyzer.load(tmp_path / "fit", model, ClassificationTask())


class _ScalarLoss(Task):
    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])


def test_bad_input_is_a_clear_error():
    model = mlp()
    x, y = data(8)
    with pytest.raises(ValueError, match=r"one value per example \(shape \[B\]\), got \(\)"):
        InfluenceAnalyzer(model, _ScalarLoss(), method="kfac", fisher="empirical", **F64).fit(batches(x, y, 4))
    with pytest.raises(KeyError, match="no field"):
        InfluenceAnalyzer(model, ClassificationTask(), method="kfac", **F64).fit([{"input": x}])
    with pytest.raises(NotImplementedError, match="sampled_loss"):
        InfluenceAnalyzer(model, _ScalarLoss(), method="kfac", **F64).fit(batches(x, y, 4))
    with pytest.raises(RuntimeError, match="call fit"):
        InfluenceAnalyzer(model, ClassificationTask(), **F64).pairwise_scores(batches(x, y, 4), batches(x, y, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        InfluenceAnalyzer(model, ClassificationTask(), method="newton")
    with pytest.raises(ValueError, match="no module named"):
        InfluenceAnalyzer(model, ClassificationTask(), tracked_modules=["nope"])
    with pytest.raises(ValueError, match="no training examples"):
        InfluenceAnalyzer(model, ClassificationTask(), method="kfac", **F64).fit([])
    with pytest.raises(TypeError, match="Task"):
        InfluenceAnalyzer(model, lambda m, b: 0)


def test_tracked_modules_restricts_the_scores():
    model = mlp()
    x, y = data(16)
    an = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", tracked_modules=["2"], **F64)
    assert an.layers == ["2"]
    an.fit(batches(x, y, 8))
    full = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", **F64).fit(batches(x, y, 8))
    torch.testing.assert_close(an.pairwise_scores(batches(x, y, 8), batches(x, y, 8)),
                               full.pairwise_scores(batches(x, y, 8), batches(x, y, 8), per_layer=True)["2"])
    json.dumps(an.memory_estimate(10, 8))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", ["ekfac", "mfac"])
def test_two_gloo_ranks_equal_one_process(method, tmp_path):
    import dist_workers as W

    W.launch(W.influence, 2, tmp_path, method)
    got = torch.load(tmp_path / f"influence_{method}.pt")
    model, train, queries = W.influence_problem()
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, num_grads=10, **F64).fit(train)
    torch.testing.assert_close(got["scores"], an.pairwise_scores(queries, train), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["self"], an.self_scores(train), rtol=1e-9, atol=1e-12)
