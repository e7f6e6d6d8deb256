"""The training-gradient index and two-stage queries against exhaustive scoring (float64 scores): exact where the
index does not project (every side's ``k`` at least its dimension) and where the candidates cover the corpus; the
projection is unbiased (its mean over seeds is the exact inner product); incremental adds, streaming top-k,
memory-mapped shards and the clear errors. On an MLP, a CNN with GroupNorm and a transformer LM in both layouts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kfac.influence import (CausalLMTask, ClassificationTask, GradientIndex, InfluenceAnalyzer, TextCandidates)
from kfac.influence.index import IndexLayer, Projections, project_queries, project_rows


class LM(nn.Module):
    """Embedding -> one encoder layer (``seq_first``: run on ``(T, N, E)``) -> per-position head. Its own inputs are
    batch-first (declared: K-FAC reads a container's layout)."""

    batch_first = True

    def __init__(self, seq_first: bool = False, vocab: int = 9) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seq_first = seq_first
        self.embed = nn.Embedding(vocab, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=not seq_first)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.layer(h.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.layer(h)
        return self.head(h)


def problem(kind: str):
    """(model, task, training batches, query batches, training dataset of single examples)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind.startswith("lm"):
        model = LM(seq_first=kind == "lm-seq-first").double()
        ids = torch.randint(0, 9, (26, 6), generator=g)
        return model, CausalLMTask(), [ids[i:i + 6] for i in range(0, 24, 6)], [ids[24:]], list(ids[:24])
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 5 * 5, 3)).double()
        x = torch.randn(27, 2, 5, 5, generator=g, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 3)).double()
        x = torch.randn(27, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (27,), generator=g)
    return (model, ClassificationTask(), [(x[i:i + 6], y[i:i + 6]) for i in range(0, 24, 6)], [(x[24:], y[24:])],
            [(x[i], y[i]) for i in range(24)])


def analyzer(model, task, train, method="ekfac"):
    return InfluenceAnalyzer(model, task, method=method, score_dtype=torch.float64, progress=False).fit(train)


KINDS = ["mlp", "cnn", "lm", "lm-seq-first"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["ekfac", "identity"])
def test_an_unprojected_index_gives_the_exhaustive_scores_and_top_k(kind, method, tmp_path):
    model, task, train, queries, _ = problem(kind)
    an = analyzer(model, task, train, method)
    exact = an.pairwise_scores(queries, train)
    index = an.build_index(tmp_path / "index", train, dims=10_000, dtype=torch.float32)
    shapes = an._pre.block_shapes()
    assert len(index) == exact.shape[1] and index.width <= sum(g * a for g, a in shapes.values())
    if kind == "mlp":  # one row per example: the rows themselves, exact and g + a numbers instead of g a
        assert [layer.rows for layer in index.layers] == [1, 1]
        assert index.width == sum(g + a for g, a in shapes.values())
    got = an.pairwise_scores(queries, GradientIndex.open(tmp_path / "index"))
    assert float((got - exact).abs().max() / exact.abs().max()) < 1e-6  # float32 storage
    top, want = an.top_k(queries, index, k=5), an.top_k(queries, train, k=5)
    assert torch.equal(top.indices, want.indices)
    torch.testing.assert_close(top.scores, want.scores, rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_adding_in_parts_equals_building_at_once_and_positions_continue(tmp_path):
    model, task, train, queries, _ = problem("mlp")
    an = analyzer(model, task, train)
    whole = an.pairwise_scores(queries, an.build_index(tmp_path / "whole", train, dims=4, seed=3))
    index = an.build_index(tmp_path / "parts", train[:1], dims=4, seed=3)
    an.add_to_index(GradientIndex.open(tmp_path / "parts"), train[1:3])
    an.add_to_index(GradientIndex.open(tmp_path / "parts"), train[3:])
    index = GradientIndex.open(tmp_path / "parts")
    assert len(index) == 24 and len(index.manifest["shards"]) == 3
    torch.testing.assert_close(an.pairwise_scores(queries, index), whole, rtol=1e-12, atol=0)  # same projection, rows, order
    positions = torch.cat([p for _, p in index.shards()])
    assert torch.equal(positions, torch.arange(24))


def test_streaming_top_k_equals_top_k_of_the_whole_score_matrix(tmp_path):
    model, task, train, queries, _ = problem("cnn")
    an = analyzer(model, task, train)
    index = an.build_index(tmp_path / "i", train, dims=3)
    q = an._indexed_queries(queries, index)
    full = index.scores(q)
    streamed = index.top_k(q, 7, chunk=5)  # shards of 24 rows in chunks of 5
    values, where = torch.topk(full, 7, dim=1)
    assert torch.equal(streamed.indices, where)
    torch.testing.assert_close(streamed.scores, values, rtol=1e-12, atol=0)  # chunked products: summation order


@pytest.mark.parametrize("rows", [3, 0], ids=["rows-layout", "product-layout"])
def test_the_projection_is_unbiased(rows):
    """``E[<P_G Q P_A^T, sum_t (P_G g_t)(P_A a_t)^T>] = <Q, V>`` for ``N(0, 1/k)`` projections (averaged over 4000
    seeds, within four standard errors) in either layout, and ``P = I`` when ``k >= dim``."""
    g = torch.Generator().manual_seed(0)
    a, gr = torch.randn(1, 3, 7, generator=g, dtype=torch.float64), torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    q = torch.randn(1, 5, 7, generator=g, dtype=torch.float64)
    exact = float((q[0] * (gr[0].T @ a[0])).sum())

    def estimate(layer: IndexLayer, seed: int) -> float:
        p = Projections([layer], seed)
        stored = layer.encode(*project_rows({"w": (a, gr)}, p, torch.float64)["w"])
        return float(layer.scores(project_queries({"w": q}, p, torch.float64)["w"], stored))

    layer = IndexLayer("w", 5, 7, 2, 3, rows=rows)
    est = torch.tensor([estimate(layer, seed) for seed in range(4000)])
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / 4000 ** 0.5
    assert float(est.std()) > 0.1 * abs(exact)  # it does project
    assert estimate(IndexLayer("w", 5, 7, 5, 9, rows=rows), 0) == pytest.approx(exact, rel=1e-12)


def test_layouts_store_the_smaller_form_and_refuse_longer_examples_later(tmp_path):
    layer = IndexLayer("w", 64, 65, 100, 100)
    assert layer.choose(1).rows == 1 and layer.choose(1).width == 129  # g + a instead of g a
    assert layer.choose(40).rows == 0 and layer.choose(40).width == 64 * 65  # the product is smaller
    model, task, train, queries, _ = problem("lm")
    an = analyzer(model, task, train)
    index = an.build_index(tmp_path / "i", [train[0][:, :3]], dims=64)  # 3 positions per example
    assert all(layer.rows == 3 for layer in index.layers)  # 3 (g + a) < g a for every layer of this model
    with pytest.raises(ValueError, match="keeps 3 rows per example"):
        an.add_to_index(index, train[1:])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_shards_are_memory_mapped_safetensors_with_a_manifest(tmp_path):
    model, task, train, _, _ = problem("mlp")
    an = analyzer(model, task, train)
    an.build_index(tmp_path / "i", train, dims=(4), dtype=torch.float16)
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["examples"] == 24 and manifest["dtype"] == "float16" and manifest["task"] == "ClassificationTask"
    assert [layer["name"] for layer in manifest["layers"]] == an.layers
    index = GradientIndex.open(tmp_path / "i")
    grads, positions = next(index.shards())
    saved = load_file(str(tmp_path / "i" / manifest["shards"][0]["file"]))
    assert torch.equal(grads, saved["grads"]) and torch.equal(positions, saved["positions"])
    shard = str((tmp_path / "i" / manifest["shards"][0]["file"]).resolve())
    mapped = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith(shard)]
    assert any(int(lo, 16) <= grads.data_ptr() < int(hi, 16) for lo, hi in mapped), "the shard is read in place"
    assert index.bytes_per_example == index.width * 2 + 8


def test_index_errors_are_clear(tmp_path):
    model, task, train, queries, _ = problem("mlp")
    an = analyzer(model, task, train)
    index = an.build_index(tmp_path / "i", train, dims=4)
    with pytest.raises(FileExistsError, match="already holds a gradient index"):
        an.build_index(tmp_path / "i", train)
    with pytest.raises(ValueError, match="per_layer"):
        an.pairwise_scores(queries, index, per_layer=True)
    with pytest.raises(FileNotFoundError, match="no gradient index"):
        GradientIndex.open(tmp_path / "nothing")
    with torch.no_grad():
        model[0].weight.add_(1e-3)
    other = analyzer(model, task, train)
    with pytest.raises(ValueError, match="other weights"):
        other.top_k(queries, index)
    with pytest.raises(ValueError, match="float32 or torch.float16"):
        an.build_index(tmp_path / "j", train, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_two_stage_top_k_is_exhaustive_scoring_restricted_to_the_candidates(kind):
    model, task, train, queries, dataset = problem(kind)
    an = analyzer(model, task, train)
    exact = an.pairwise_scores(queries, train)
    nq = exact.shape[0]
    everything = torch.arange(24).expand(nq, -1)
    top, want = an.top_k(queries, dataset, k=4, candidates=everything, batch_size=5), an.top_k(queries, train, k=4)
    assert torch.equal(top.indices, want.indices)
    some = torch.stack([torch.randperm(24, generator=torch.Generator().manual_seed(q))[:6] for q in range(nq)])
    top = an.top_k(queries, dataset, k=3, candidates=some, batch_size=4)
    for q in range(nq):
        values, pick = torch.topk(exact[q, some[q]], 3)
        assert torch.equal(top.indices[q], some[q][pick])
        torch.testing.assert_close(top.scores[q], values, rtol=1e-10, atol=1e-12)


def test_two_stage_input_errors_are_clear():
    model, task, train, queries, dataset = problem("mlp")
    an = analyzer(model, task, train)
    with pytest.raises(TypeError, match="pass the training dataset"):
        an.top_k(queries, iter(train), candidates=torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="positions in the training set"):
        an.top_k(queries, dataset, candidates=torch.full((3, 2), 24))
    with pytest.raises(ValueError, match="candidate rows"):
        an.top_k(queries, dataset, candidates=torch.zeros(2, 2, dtype=torch.int64))


def test_text_candidates_rank_by_tfidf_cosine_similarity():
    docs = ["the cat sat on the mat", "dogs chase cats", "a quick brown fox", "the mat was red", "fox and dog"]
    tc = TextCandidates(docs)
    picked = tc.select(["the cat on the mat", "brown fox"], 2)
    assert picked[0, 0] == 0 and picked[1, 0] == 2 and picked.shape == (2, 2)
    sims = tc.similarities(["the cat on the mat"])[0]
    assert list(picked[0]) == list(np.argsort(-sims)[:2])
    assert tc.select(["fox"], 0.4).shape == (1, 2) and tc.select(["fox"], 1.0).shape == (1, 5)
    ids = TextCandidates([[1, 2, 3, 4], [5, 6, 7], [1, 2, 9]])
    assert ids.select([torch.tensor([1, 2, 3])], 1)[0, 0] == 0
    with pytest.raises(TypeError, match="token ids"):
        ids.select(["text"], 1)
    with pytest.raises(ValueError, match="positive int or a fraction"):
        tc.select(["fox"], 0)
    with pytest.raises(ValueError, match="fraction must be in"):
        tc.select(["fox"], 1.5)
