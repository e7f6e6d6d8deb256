"""A gradient index built under ``torchrun`` (each rank projects its batches and writes its shard, rank 0 the
manifest) equals the single-process index, and so does a two-stage query: a plain model over 2 ranks and an
FSDP2-sharded one (gloo, CPU)."""

import pytest
import torch
import torch.distributed as dist

from kfac.influence import ClassificationTask, InfluenceAnalyzer

import dist_workers as D

fsdp_workers = pytest.importorskip("fsdp_workers", exc_type=ImportError, reason="needs FSDP2 (torch >= 2.4)")

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(240)]


@pytest.mark.parametrize("kind,sharded", [("mlp", False), ("mlp", True), ("block", True)])
def test_index_built_on_two_ranks_equals_one_process(kind, sharded, tmp_path):
    batches = 5  # uneven over 2 ranks: one rank indexes a batch more
    reports = D.launch(fsdp_workers.influence_index, 2, tmp_path, kind, batches, sharded, timeout=200)
    got = torch.load(tmp_path / "index_scores.pt")
    model = fsdp_workers.make_model(kind)
    train, queries = fsdp_workers.influence_data(kind, batches)
    an = InfluenceAnalyzer(model, ClassificationTask(), method="ekfac", factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False).fit(train)
    index = an.build_index(tmp_path / "single", train, dims=5, dtype=torch.float32)
    want = an.pairwise_scores(queries, index)
    assert got["examples"] == len(index) == 4 * batches and all(r["examples"] == 4 * batches for r in reports)
    assert got["shards"] == 4  # two adds, a shard per rank each
    torch.testing.assert_close(got["scores"], want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(got["indices"], an.top_k(queries, index, k=4).indices)
    dataset = [(x[i], y[i]) for x, y in train for i in range(len(x))]
    candidates = fsdp_workers.two_stage_candidates(len(dataset), 3)
    assert torch.equal(got["two_stage"], an.top_k(queries, dataset, k=3, candidates=candidates).indices)
