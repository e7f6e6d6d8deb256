"""A rank that skips ``step()`` or calls it an extra time (2 gloo ranks, DDP + kfac.KFAC): every rank ends within
a bounded time with a clear error naming the step and the ranks (DistributedConfig.step_timeout), never a hang
until the process-group timeout (60 s here, 30 minutes by default)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import dist_workers as W
import step_fence_workers as S

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(180)]

BOUND = 30  # seconds: far below the 60 s process-group timeout, above step_timeout plus the store's grace period


def test_rank_that_skips_step_then_zero_grad_fails_every_rank_at_once(tmp_path):
    """Rank 1 ``continue``s after backward at step 2; its ``opt.zero_grad()`` meets rank 0's ``step()`` at the fence:
    the same error on both ranks, naming the step and what each rank did, without waiting for any timeout."""
    reports = W.launch(S.mismatched_steps, 2, tmp_path, "skip", timeout=90)
    for r in reports:
        msg = r["error_message"]
        assert r["runtime_error"] and f"at step {S.SKIPPED}" in msg, r
        assert "rank 0: step()" in msg and "rank 1: zero_grad() after a backward pass without step()" in msg, r
        assert r["elapsed"] < S.STEP_TIMEOUT, r
        assert r["steps"] == S.SKIPPED, r


def test_rank_that_skips_step_silently_fails_the_others_after_step_timeout(tmp_path):
    """Rank 1 skips step() and zeroes the model's gradients itself (K-FAC never hears of it): rank 0 waits
    ``step_timeout`` in step(), then raises naming the step and rank 1; rank 1 (blocked in DDP's all-reduce)
    fails as soon as rank 0 exits."""
    reports = W.launch(S.mismatched_steps, 2, tmp_path, "skip_model_zero_grad", timeout=90)
    r0, r1 = reports
    assert r0["runtime_error"] and f"reached step() at step {S.SKIPPED}, but rank(s) [1] did not" in \
        r0["error_message"], r0
    assert S.STEP_TIMEOUT <= r0["elapsed"] < BOUND, r0
    assert r1["error_message"] and r1["elapsed"] < BOUND, r1


def test_rank_that_calls_step_an_extra_time_fails_after_step_timeout(tmp_path):
    """Rank 1 calls step() once more at the end (after a no_sync backward) while rank 0 has finished: rank 1
    raises naming the step and rank 0, and both processes end (rank 0 normally)."""
    r0, r1 = W.launch(S.mismatched_steps, 2, tmp_path, "extra", timeout=90)
    assert r0["error_message"] is None and r0["steps"] == W.STEPS, r0
    assert r1["runtime_error"] and f"reached step() at step {W.STEPS}, but rank(s) [0] did not" in \
        r1["error_message"], r1
    assert S.STEP_TIMEOUT <= r1["elapsed"] < BOUND, r1


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "300"])
def test_step_timeout_is_validated_once(bad):
    from kfac.distributed.config import DistributedConfig

    with pytest.raises(ValueError, match="step_timeout"):
        DistributedConfig(step_timeout=bad)
    assert DistributedConfig().step_timeout == 300.0 and DistributedConfig(step_timeout=None).step_timeout is None
