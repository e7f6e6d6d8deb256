"""Distributed reliability (gloo): per-rank branches, weight sharing, empty ranks, DDP options, lone saves, option and
schedule mismatches, non-finite updates, float16 wire overflow and a rank dying mid-step. Every scenario runs real
processes under a deadline (a hang fails the test) and, where a result exists, equals the single process on the
same global batch in float64."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kfac

import dist_workers as W
import reliability_workers as R

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(240)]

TOL = dict(rtol=1e-6, atol=1e-9)
SINGLE_KW = {**W.KFAC_KW}


def _single(model, opt, forward, steps=R.STEPS):
    for step in range(steps):
        x, y = W.batch(step)
        opt.zero_grad()
        forward(model, x, y, step).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("strategy", ["comm-opt", "dp-kfac"])
def test_layer_run_on_one_rank_only_works_and_equals_single_process(strategy, tmp_path):
    """DDP(find_unused_parameters=True) with a branch taken on rank 0 only at step 0: no hang, the branch stays
    tracked, contributes zero rows on rank 1, and training equals the single process on the same global batch."""
    reports = W.launch(R.per_rank_branch, 2, tmp_path, strategy)
    for r in reports:
        assert "branch" in r["layers"] and r["unused_after_first"] == [] and r["unused"] == []
    want = R.reference_branch({**W.KFAC_KW, "inv_update_steps": 1})
    for g, w in zip(torch.load(tmp_path / f"branch_{strategy}.pt"), want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("strategy", ["comm-opt", "dp-kfac"])
def test_layer_applied_twice_equals_single_process(strategy, tmp_path):
    """Weight sharing with one layer per bucket: the shared layer's bucket launches only after both uses'
    gradients arrived, so G equals the single process."""
    reports = W.launch(R.shared_layer, 2, tmp_path, strategy)
    model = R.SharedNet()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **W.KFAC_KW)
    want = _single(model, opt, lambda m, x, y, s: F.cross_entropy(m(x), y))
    for g, w in zip(torch.load(tmp_path / f"shared_{strategy}.pt"), want):
        torch.testing.assert_close(g, w, **TOL)
    assert all(r["launched_early"] > 0 for r in reports)  # the overlap still happens


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_rank_with_an_empty_batch_contributes_nothing(method, tmp_path):
    W.launch(R.empty_rank, 2, tmp_path, method)
    model = W.make_model(pooled=True)
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), method=method, **W.KFAC_KW)
    per = W.GLOBAL_BATCH // 2

    def loss(m, x, y, step):
        if step == 1:  # rank 1's rows are missing: the global batch is rank 0's rows
            x, y = x[:per], y[:per]
        return F.cross_entropy(m(x), y, reduction="sum") / W.GLOBAL_BATCH

    want = _single(model, opt, loss)
    for g, w in zip(torch.load(tmp_path / f"empty_{method}.pt"), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("variant", ["no_sync", "bucket_view", "find_unused"])
def test_ddp_options_equal_single_process(variant, tmp_path):
    W.launch(R.ddp_variant, 2, tmp_path, variant)
    model = W.make_model()
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **W.KFAC_KW)
    want = _single(model, opt, lambda m, x, y, s: F.cross_entropy(m(x), y))
    for g, w in zip(torch.load(tmp_path / f"variant_{variant}.pt"), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_rank0_state_dict_save_never_hangs_and_loads_where_it_can(tmp_path):
    """``if rank == 0: torch.save(opt.state_dict(), ...)``: no collective, so no hang. Under comm-opt rank 0 holds
    everything and the file resumes anywhere (also in one process); under dp-kfac it is rank 0's shard: it resumes
    rank 0 only, and any other rank gets a clear error (never silently missing factors)."""
    for strategy in ("comm-opt", "dp-kfac"):
        reports = W.launch(R.rank0_save, 2, tmp_path, strategy)
        uninterrupted = torch.load(tmp_path / f"uninterrupted_{strategy}.pt")
        if strategy == "comm-opt":
            assert all(r["shard"] is None and r["rank0"] == "ok" and r["own"] == "ok" for r in reports)
            for g, w in zip(torch.load(tmp_path / "resumed_rank0_comm-opt.pt"), uninterrupted):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
            # the complete state resumes in a single process as well (world size 1)
            state = torch.load(tmp_path / "rank0_comm-opt.pt", weights_only=False)
            model = W.make_model()
            opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **W.KFAC_KW)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            W.train(model, opt, range(2, 3))
            for g, w in zip(model.parameters(), uninterrupted):
                torch.testing.assert_close(g.detach(), w, rtol=1e-10, atol=1e-12)
        else:
            assert reports[0]["shard"]["rank"] == 0 and reports[1]["shard"]["rank"] == 1
            assert reports[0]["rank0"] == "ok" and "shard of rank 0" in reports[1]["rank0"]
            assert "consolidated_state_dict" in reports[1]["rank0"]
            assert all(r["own"] == "ok" for r in reports)  # one file per rank resumes at the same world size
            for g, w in zip(torch.load(tmp_path / "resumed_own_dp-kfac.pt"), uninterrupted):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_schedules_that_diverge_across_ranks_fail_before_they_desynchronise(tmp_path):
    reports = W.launch(R.mismatched_schedule, 2, tmp_path, timeout=60)
    for r in reports:
        assert r["error_message"] and "factor_update_steps" in r["error_message"], r
        assert "differs between ranks" in r["error_message"]
        assert r["steps"] == 1  # caught at step 1, which checks steps 1 and 2 (rank 1 diverges at step 2)


@pytest.mark.parametrize("option", ["damping", "kl_clip", "comm_dtype"])
def test_options_that_differ_across_ranks_are_named_on_every_rank(option, tmp_path):
    reports = W.launch(R.mismatched_option, 2, tmp_path, option, timeout=60)
    for r in reports:
        assert r["error_message"] and option in r["error_message"] and "differs between ranks" in r["error_message"]


def test_non_finite_preconditioned_gradient_falls_back_identically_on_every_rank(tmp_path):
    reports = W.launch(R.nan_decomposition, 2, tmp_path)
    for r in reports:
        assert r["fallbacks"] == {r["victim"]: 1} and r["plain"] and r["finite"]
    assert reports[0]["params"] == reports[1]["params"]


def test_float16_wire_overflow_widens_the_wire_instead_of_dropping_every_update(tmp_path):
    reports = W.launch(R.half_wire_overflow, 2, tmp_path)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64) * 1e3
    want = x.T @ x / 8
    for r in reports:
        assert r["discarded"] == 1 and r["A"][0] is None  # step 0: overflow, dropped on every rank together
        torch.testing.assert_close(torch.tensor(r["A"][1], dtype=torch.float64), want, rtol=1e-6, atol=0)


def test_rank_dying_mid_step_makes_the_others_fail_fast(tmp_path):
    store = tmp_path / f"pg_store_{uuid.uuid4().hex}"
    ctx = mp.start_processes(W._entry, args=(R.raise_mid_step, 2, str(tmp_path), str(store), ()), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        # no ctx.join(): it would terminate rank 0 as soon as rank 1 exits
        while ctx.processes[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result.get("error_message"), result
    assert result["elapsed"] < 20, result  # the process-group timeout is 60 s: a hang would take that long
