"""Reliability of kfac.influence: batches with no examples, the weights checksum of saved fits, skipped modules.

References: the same analysis without the empty batches (itself checked against dense float64 references in
test_influence.py), plain per-example gradient dot products from torch.func, and SHA-256 by hand.
"""

import copy
import hashlib
import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from torch.func import functional_call, grad, vmap

from helpers import float64_default, single_thread  # noqa: F401
from kfac.influence import CausalLMTask, ClassificationTask, InfluenceAnalyzer, weights_digest
from kfac.kronecker.methods import EigenCorrectedKFAC
from kfac.modules import ConvAdapter, LinearAdapter
from kfac.kronecker.store import FactorEntry

F64 = dict(factor_dtype=torch.float64, score_dtype=torch.float64, progress=False)
METHODS = ["ekfac", "kfac", "mfac", "identity"]

pytestmark = pytest.mark.usefixtures("float64_default")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def data(n: int, seed: int = 1, shape: tuple[int, ...] = (4,)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def empty_like(batch):
    x, y = batch
    return x[:0], y[:0]


def with_empty(bs: list, *, wrap: bool = False) -> list:
    """``bs`` with an empty batch first, one in the middle and one last (wrapped in :class:`Opaque` if asked)."""
    e = empty_like(bs[0])
    out = [e, *bs[:1], e, *bs[1:], e]
    return [Opaque(b) for b in out] if wrap else out


class Opaque:
    """A batch type the analyzer cannot look into: its empty batches go through the whole pipeline."""

    def __init__(self, batch):
        self.batch = batch


class OpaqueTask(ClassificationTask):
    def _split(self, batch):
        return super()._split(batch.batch if isinstance(batch, Opaque) else batch)


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(N, P)``: each example's cross-entropy gradient over all parameters (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], 1)


def fitted_state(an: InfluenceAnalyzer) -> dict[str, torch.Tensor]:
    """Every fitted tensor: factors, eigenbases, Lambda (ekfac/kfac) or M-FAC's gradients, and the damping."""
    out = {f"damping.{n}": torch.tensor(v) for n, v in an.damping.items()}
    if an.args.method in ("ekfac", "kfac"):
        for n in an.layers:
            e = an.store[n]
            out.update({f"{n}.A": e.A, f"{n}.G": e.G, f"{n}.QA": e.QA, f"{n}.QG": e.QG,
                        f"{n}.Lambda": e.extras["Lambda"]})
    if an.args.method == "mfac":
        out.update({f"mfac.{n}": g for n, g in an._mfac_grads.items()})
    return out


def assert_same_state(got: InfluenceAnalyzer, want: InfluenceAnalyzer) -> None:
    a, b = fitted_state(got), fitted_state(want)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 1. batches with no examples ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_empty_batches_change_nothing(method, fisher):
    """Fit, pairwise, self and top-k scores with empty batches among the others equal those without, bit for bit;
    with fisher="mc" the labels sampled for the other batches do not move either."""
    model = mlp()
    x, y = data(20)
    xq, yq = data(5, seed=2)
    kw = dict(method=method, fisher=fisher, num_grads=7, **F64)
    ref = InfluenceAnalyzer(model, ClassificationTask(), **kw).fit(batches(x, y, 6))
    an = InfluenceAnalyzer(model, ClassificationTask(), **kw).fit(with_empty(batches(x, y, 6)))
    assert_same_state(an, ref)
    train, queries = batches(x, y, 7), batches(xq, yq, 2)
    want = ref.pairwise_scores(queries, train)
    torch.testing.assert_close(an.pairwise_scores(with_empty(queries), with_empty(train)), want, rtol=0, atol=0)
    torch.testing.assert_close(an.self_scores(with_empty(train)), ref.self_scores(train), rtol=0, atol=0)
    top, top_ref = an.top_k(with_empty(queries), with_empty(train), k=3), ref.top_k(queries, train, k=3)
    assert torch.equal(top.indices, top_ref.indices) and torch.equal(top.scores, top_ref.scores)
    if method == "identity":  # and the reference itself: plain gradient dot products
        torch.testing.assert_close(want, gradients(model, xq, yq) @ gradients(model, x, y).T)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("query_rank", [None, 2])
def test_empty_batches_of_an_opaque_batch_type_flow_through_as_zero_sized_blocks(method, query_rank):
    """Empty batches the analyzer cannot recognise are run through the model (0-row layer inputs, convolutions
    included) and contribute 0-sized blocks: the same fit and scores as without them."""
    model = cnn()
    x, y = data(12, shape=(2, 4, 4))
    kw = dict(method=method, fisher="empirical", num_grads=5, query_rank=query_rank, **F64)
    ref = InfluenceAnalyzer(model, OpaqueTask(), **kw).fit(batches(x, y, 5))
    an = InfluenceAnalyzer(model, OpaqueTask(), **kw).fit(with_empty(batches(x, y, 5), wrap=True))
    assert_same_state(an, ref)
    train, queries = batches(x, y, 5), batches(x[:4], y[:4], 3)
    want = ref.pairwise_scores(queries, train)
    got = an.pairwise_scores(with_empty(queries, wrap=True), with_empty(train, wrap=True))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(an.self_scores(with_empty(train, wrap=True)), ref.self_scores(train), rtol=0, atol=0)
    if method == "identity" and query_rank is None:
        torch.testing.assert_close(want, gradients(model, x[:4], y[:4]) @ gradients(model, x, y).T)


def test_loaders_of_only_empty_batches_are_a_clear_error():
    model = mlp()
    x, y = data(6)
    empty = [empty_like((x, y))] * 2
    with pytest.raises(ValueError, match="no training examples"):
        InfluenceAnalyzer(model, ClassificationTask(), method="kfac", **F64).fit(empty)
    an = InfluenceAnalyzer(model, ClassificationTask(), method="identity", **F64).fit(batches(x, y, 3))
    with pytest.raises(ValueError, match="query loader yielded no examples"):
        an.pairwise_scores(empty, batches(x, y, 3))
    with pytest.raises(ValueError, match="training loader yielded no examples"):
        an.self_scores(empty)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)

    def forward(self, ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_fit_on_data_whose_every_position_is_masked_is_a_clear_error(method):
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(0))
    masked = [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}]
    an = InfluenceAnalyzer(TinyLM(), CausalLMTask(), method=method, **F64)
    with pytest.raises(ValueError, match=r"saw 4 training examples but not one position that counts"):
        an.fit(masked)
    an.fit([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])  # the same data unmasked fits


@pytest.mark.parametrize("adapter", ["linear", "conv"])
def test_example_rows_of_no_examples_give_a_zero_eigenvalue_correction(adapter):
    """The per-example rows of a 0-example input (shared with K-FAC's EK-FAC corrections, which divide the
    correction sum by the rows per example) give a correction of exactly 0, not an error or NaN."""
    if adapter == "linear":
        module = nn.Linear(4, 3)
        x, out = torch.zeros(0, 5, 4), torch.zeros(0, 5, 3)
        ad = LinearAdapter(module)
    else:
        module = nn.Conv2d(2, 3, 3)
        x, out = torch.zeros(0, 2, 5, 5), torch.zeros(0, 3, 3, 3)
        ad = ConvAdapter(module)
    a, g = ad.example_rows(x, out, torch.float64)
    assert (a.shape[0], g.shape[0]) == (0, 0)

    entry = FactorEntry(name="layer", a_dim=ad.a_dim, g_dim=3, QA=torch.linalg.qr(torch.randn(ad.a_dim, ad.a_dim))[0],
                        QG=torch.linalg.qr(torch.randn(3, 3))[0], dA=torch.ones(ad.a_dim), dG=torch.ones(3))
    part = EigenCorrectedKFAC().correction_sum(entry, a, g) / a.shape[1]
    torch.testing.assert_close(part, torch.zeros(3, ad.a_dim), rtol=0, atol=0)


# -- 2. the weights checksum of saved fits ---------------------------------------------------------------------------
def test_weights_digest_is_sha256_of_the_float64_parameters():
    model = mlp()
    want = hashlib.sha256()
    for name, p in model.named_parameters():
        want.update(f"{name}:{tuple(p.shape)};".encode())
        want.update(p.detach().double().numpy().tobytes())
    assert weights_digest(model) == want.hexdigest()
    single = mlp().float()
    assert weights_digest(single) == weights_digest(copy.deepcopy(single).double())  # same values, other dtype
    assert weights_digest(mlp(seed=1)) != want.hexdigest()
    code = ("import torch; from torch import nn; from kfac.influence import weights_digest; "
            "torch.manual_seed(0); torch.set_default_dtype(torch.float64); "
            "print(weights_digest(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))))")
    other_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_run.stdout.strip() == want.hexdigest()


@pytest.mark.parametrize("method", ["ekfac", "mfac"])
def test_load_checks_the_weights_the_fit_was_made_on(method, tmp_path):
    model = mlp()
    x, y = data(16)
    queries, train = batches(x[:3], y[:3], 3), batches(x, y, 8)
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, num_grads=6, **F64).fit(train)
    scores = an.pairwise_scores(queries, train)
    an.save(tmp_path / "fit")
    assert json.loads((tmp_path / "fit" / "influence.json").read_text())["weights_sha256"] == weights_digest(model)

    again = InfluenceAnalyzer.load(tmp_path / "fit", mlp(), ClassificationTask(), progress=False)  # same weights
    torch.testing.assert_close(again.pairwise_scores(queries, train), scores, rtol=1e-12, atol=1e-12)

    other = mlp()
    with torch.no_grad():
        other[2].weight[1, 2] += 1e-3
    with pytest.raises(ValueError, match=r"fitted on other weights.*refit.*check_weights=False"):
        InfluenceAnalyzer.load(tmp_path / "fit", other, ClassificationTask(), progress=False)
    loaded = InfluenceAnalyzer.load(tmp_path / "fit", other, ClassificationTask(), progress=False,
                                    check_weights=False)
    assert_same_state(loaded, an)  # the saved fit, on the caller's weights
    torch.testing.assert_close(loaded.pairwise_scores(queries, train[:1]),
                               InfluenceAnalyzer.load(tmp_path / "fit", other, ClassificationTask(), progress=False,
                                                      check_weights=False).pairwise_scores(queries, train[:1]))
    assert not torch.allclose(loaded.pairwise_scores(queries, train), scores)  # the perturbation is visible


def _saved_as_before(tmp_path, method: str, drop: tuple[str, ...]) -> InfluenceAnalyzer:
    """Fit and save an analyzer, then delete the settings key at path ``drop`` (as an older version wrote it)."""
    x, y = data(12)
    an = InfluenceAnalyzer(mlp(), ClassificationTask(), method=method, **F64).fit(batches(x, y, 6))
    an.save(tmp_path / "fit")
    settings = tmp_path / "fit" / "influence.json"
    old = json.loads(settings.read_text())
    node = old
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    settings.write_text(json.dumps(old))
    return an


def test_files_without_a_checksum_still_load_with_a_warning(tmp_path, caplog):
    an = _saved_as_before(tmp_path, "kfac", ("weights_sha256",))  # as saved before the checksum existed
    other = mlp(seed=3)  # cannot be detected without a checksum
    with caplog.at_level(logging.WARNING, logger="kfac"):
        loaded = InfluenceAnalyzer.load(tmp_path / "fit", other, ClassificationTask(), progress=False)
    assert any("no weights checksum" in r.getMessage() for r in caplog.records)
    assert_same_state(loaded, an)


def test_files_from_before_an_argument_existed_load_with_its_default(tmp_path):
    """A fit saved before ``lambda_labels`` existed loads with the default ("data", what was done then)."""
    an = _saved_as_before(tmp_path, "ekfac", ("arguments", "lambda_labels"))
    loaded = InfluenceAnalyzer.load(tmp_path / "fit", mlp(), ClassificationTask(), progress=False)
    assert loaded.args.lambda_labels == "data"
    assert_same_state(loaded, an)


# -- 3. skipped modules --------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    """An embedding, a supported layer, an unsupported one, a frozen layer, a partly frozen one and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.partly = nn.Linear(6, 6)
        self.partly.bias.requires_grad_(False)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.partly(self.frozen(self.norm(self.fc(self.emb(tokens).mean(1))))))


def influence_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and "influence" in str(w.message)]


def test_skipped_lists_every_untracked_module_with_parameters_and_warns_once_for_unexpected_ones():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        an = InfluenceAnalyzer(Mixed(), ClassificationTask(), **F64)
    assert an.layers == ["fc", "head"]
    skipped = dict(an.skipped)
    assert list(skipped) == ["emb", "norm", "frozen", "partly"]
    assert "embeddings" in skipped["emb"]
    assert "per-example" in skipped["norm"]  # normalisation layers: no V_n = sum_t g a^T form
    assert "frozen" in skipped["frozen"] and "frozen" in skipped["partly"]
    msgs = influence_warnings(record)
    assert len(msgs) == 1
    assert "'norm'" in msgs[0] and "'partly'" in msgs[0]  # trainable parameters left out
    assert "'emb'" not in msgs[0] and "'frozen'" not in msgs[0]  # by design / not trained
    assert record[0].filename == __file__  # points at the caller
    an.skipped.clear()  # read-only: a copy
    assert dict(an.skipped) == skipped


def test_modules_left_out_of_tracked_modules_are_listed_without_a_warning():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        an = InfluenceAnalyzer(Mixed(), ClassificationTask(), tracked_modules=["head"], **F64)
    assert an.layers == ["head"]
    assert an.skipped == [(n, "not listed in tracked_modules") for n in ("emb", "fc", "norm", "frozen", "partly")]
    assert influence_warnings(record) == []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        an = InfluenceAnalyzer(mlp(), ClassificationTask(), **F64)
    assert an.skipped == [] and influence_warnings(record) == []


class TiedLM(nn.Module):
    """GPT-2's pattern: token and position embeddings, norms, a head tied to the token embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.ln_1, self.ln_f = nn.LayerNorm(4), nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids, attention_mask=None):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        return self.lm_head(self.ln_f(self.fc(self.ln_1(h))))


def test_skip_warning_is_one_short_line_per_reason_and_names_the_tied_head_truthfully():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        an = InfluenceAnalyzer(TiedLM(), CausalLMTask(), **F64)
    assert an.layers == ["fc"]
    skipped = dict(an.skipped)
    assert "tied to an output layer" in skipped["wte"] and "embeddings" in skipped["wpe"]
    assert skipped["lm_head"] == "shares its weight with 'wte', which influence does not track either"
    (msg,) = influence_warnings(record)
    lines = msg.splitlines()
    assert len(lines) == 3 and all(len(line) <= 160 for line in lines), lines  # a header, then one per reason
    assert lines[1].startswith("  'ln_1', 'ln_f': normalisation layer")
    assert lines[2].startswith("  'lm_head': shares its weight with 'wte'")


def test_kfac_skip_warning_groups_modules_by_reason():
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnns = nn.ModuleList([nn.GRU(3, 3) for _ in range(6)])
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            for rnn in self.rnns:
                x = rnn(x)[0]
            return self.head(x)

    with pytest.warns(UserWarning) as record:
        kfac.KFACPreconditioner(Recurrent())
    (msg,) = [str(w.message) for w in record if "not preconditioned" in str(w.message)]
    lines = msg.splitlines()
    assert len(lines) == 2 and all(len(line) <= 200 for line in lines), lines
    assert lines[1].startswith("  'rnns.0', 'rnns.1', 'rnns.2', 'rnns.3' and 2 more: recurrent layer GRU")


def test_a_batch_capture_is_freed_after_its_rows_are_read():
    """The outputs' tensor hooks refer back to the capture; before the cycle was broken every batch's inputs and
    output gradients stayed alive (the fitting and scoring passes grew by a batch of rows per batch: 23 GB on an
    8000-sequence corpus)."""
    import gc
    import weakref

    from kfac.influence.gradients import capture

    model = TinyLM()
    an = InfluenceAnalyzer(model, CausalLMTask(), progress=False)
    ids = torch.randint(0, 7, (4, 5))
    with capture(an._pre.adapters, torch.float32) as cap:
        losses = CausalLMTask().loss(model, ids)
        torch.autograd.grad(losses.sum(), cap.outputs)
    assert set(cap.rows) == set(an.layers)
    ref = weakref.ref(cap)
    del cap, losses  # the loss's graph holds the output hooks until it goes
    gc.collect()
    assert ref() is None
