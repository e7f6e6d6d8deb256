"""Adaptive K-FAC on 2 gloo ranks equals one process on the same global batch (float64)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import kfac
from kfac.adaptive.controller import AdaptiveConfig

import dist_workers as W

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(240)]


@pytest.mark.parametrize("strategy", ["comm-opt", "dp-kfac"])
def test_adaptive_equals_single_process(strategy, tmp_path):
    reports = W.launch(W.adaptive, 2, tmp_path, strategy)
    model = W.make_model(pooled=True)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=1.0), adaptive=AdaptiveConfig(adapt_every=2),
                    factor_dtype=torch.float64, fisher="empirical")
    for step in range(W.STEPS):
        x, y = W.batch(step)
        opt.step(lambda: F.cross_entropy(model(x), y))
    for g, w in zip(torch.load(tmp_path / f"adaptive_{strategy}.pt"), model.parameters()):
        torch.testing.assert_close(g, w.detach(), rtol=1e-6, atol=1e-9)
    assert all(r["damping"] == pytest.approx(opt.adaptive.damping, rel=1e-9) for r in reports)


def test_adaptive_with_sampled_fisher_keeps_ranks_identical(tmp_path):
    """With the default Monte-Carlo Fisher each rank samples its own labels (equal to one process in distribution
    only), but every rank still takes the same step: the same parameters, λ and scale on both ranks."""
    reports = W.launch(W.adaptive, 2, tmp_path, "dp-kfac", "mc")
    first, second = reports
    assert first["damping"] == second["damping"]
    assert first["params"] == second["params"]
    assert all(torch.isfinite(torch.tensor(p)).all() for p in first["params"])
