"""Tests of the sharding planner (kfac.planner): LPT quality, determinism, memory caps, traffic formulas, CLI."""

from __future__ import annotations

import ast
import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kfac.planner import (
    STRATEGIES, CostModel, LayerSpec, MemoryCapError, Plan, calibrate, default_strategy, layer_specs, make_plan,
)
from kfac.planner.assign import kaisa_greedy, lpt, makespan, round_robin
from kfac.planner.plan import grad_receiver_rows, grad_worker_columns

ROOT = Path(__file__).resolve().parents[2]
PLANNER_DIR = ROOT / "kfac" / "planner"
UNIT = CostModel(c_eig=1.0, c_inv=1.0, c_mm=0.0)  # decomposition of d costs d^3 seconds, preconditioning is free


def _toy() -> list[LayerSpec]:
    return [LayerSpec("l1", 3, 2), LayerSpec("l2", 4, 5)]


def _mixed() -> list[LayerSpec]:
    """Layers with repeated shapes (equal costs) and a diagonal A."""
    return [LayerSpec("emb", 300, 16, a_diagonal=True), LayerSpec("fc1", 65, 64), LayerSpec("fc2", 65, 64),
            LayerSpec("fc3", 65, 64), LayerSpec("conv", 288, 32), LayerSpec("conv_b", 288, 32),
            LayerSpec("head", 129, 10), LayerSpec("proj", 33, 128)]


# -- LPT ---------------------------------------------------------------------------------------------------------
def test_lpt_within_graham_bound_of_brute_force_optimum():
    rng = random.Random(1234)
    worst = 1.0
    for _ in range(50):
        jobs = [rng.uniform(0.1, 10.0) for _ in range(rng.randint(3, 7))]
        m = rng.randint(2, 3)
        ranks = lpt(jobs, m)
        got = makespan(jobs, ranks, m)
        opt = min(makespan(jobs, a, m) for a in itertools.product(range(m), repeat=len(jobs)))
        assert got <= (4 / 3 - 1 / (3 * m)) * opt + 1e-12
        worst = max(worst, got / opt)
    assert worst >= 1.0


def test_lpt_ties_go_to_lowest_rank_then_name_order():
    # equal costs: jobs in name order onto ranks 0, 1, 2, then the least loaded (rank 0 again)
    assert lpt([1.0, 1.0, 1.0, 1.0], 3, names=["d", "c", "b", "a"]) == (0, 2, 1, 0)


def test_lower_bound_and_imbalance_on_hand_instance():
    # colocated dp-kfac jobs a^3 + g^3: 28, 28, 16, 16, 16 on 2 ranks; LPT gives 28+16+16 | 28+16
    specs = [LayerSpec("a", 3, 1), LayerSpec("b", 3, 1), LayerSpec("c", 2, 2), LayerSpec("d", 2, 2),
             LayerSpec("e", 2, 2)]
    plan = make_plan(specs, 2, "dp-kfac", cost_model=UNIT, split=False)
    assert plan.rank_load == (60.0, 44.0)
    assert plan.lower_bound == max(28.0, 104.0 / 2) == 52.0
    assert plan.makespan == 60.0
    assert plan.imbalance == pytest.approx(60 / 52)
    assert [plan.owner(n, "A") for n in "abcde"] == [0, 1, 0, 1, 0]
    # the largest job dominates the bound when there are more ranks
    assert make_plan(specs, 8, "dp-kfac", cost_model=UNIT, split=False).lower_bound == 28.0
    # comm-opt: every rank preconditions every layer, so the bound is sum(P) + max(largest job, total / N)
    cm = CostModel(c_eig=1.0, c_mm=0.5)
    plan = make_plan(specs, 2, "comm-opt", cost_model=cm, split=False)
    pre = sum(cm.precondition_seconds(s) for s in specs)
    assert plan.lower_bound == pytest.approx(pre + max(28.0, 104.0 / 2))
    assert all(load >= pre for load in plan.rank_load)


def test_resnet50_dp_kfac_lpt_within_5_percent_of_lower_bound():
    torchvision = pytest.importorskip("torchvision")
    specs = layer_specs(torchvision.models.get_model("resnet50", weights=None))
    assert len(specs) == 107 and specs[-1] == LayerSpec("fc", 2049, 1000)
    for n in (8, 64, 256):
        for iu in (1, 10):
            plan = make_plan(specs, n, "dp-kfac", inv_update_steps=iu)
            assert plan.lower_bound <= plan.makespan <= 1.05 * plan.lower_bound, (n, iu, plan.imbalance)
            # same search space (colocated) for a like-for-like comparison with the baselines
            ours = make_plan(specs, n, "dp-kfac", inv_update_steps=iu, split=False)
            rr = make_plan(specs, n, "dp-kfac", inv_update_steps=iu, split=False, assigner="round-robin")
            kg = make_plan(specs, n, "dp-kfac", inv_update_steps=iu, split=False, assigner="kaisa-greedy")
            assert ours.makespan <= min(rr.makespan, kg.makespan)
            assert rr.lower_bound == kg.lower_bound == ours.lower_bound >= plan.lower_bound


# -- determinism -------------------------------------------------------------------------------------------------
_SUBPROCESS = r"""
import json, sys
sys.modules["torch"] = None          # the planner must not need torch to plan
sys.path.insert(0, sys.argv[1])      # import kfac/planner as a top-level package (skips kfac/__init__)
import planner
specs = [planner.LayerSpec(**d) for d in json.loads(sys.argv[2])]
out = {}
for strategy in planner.STRATEGIES:
    out[strategy] = planner.make_plan(specs, 8, strategy, inv_update_steps=10).digest()
print(json.dumps(out))
"""


def test_digest_is_stable_across_calls_processes_and_hash_seeds():
    specs = _mixed()
    local = {s: make_plan(specs, 8, s, inv_update_steps=10).digest() for s in STRATEGIES}
    assert local == {s: make_plan(specs, 8, s, inv_update_steps=10).digest() for s in STRATEGIES}
    assert len(set(local.values())) == len(STRATEGIES)
    payload = json.dumps([s.to_dict() for s in specs])
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(PLANNER_DIR.parent), payload],
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == local


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lpt_plan_does_not_depend_on_input_order(strategy):
    specs = _mixed()
    ref = make_plan(specs, 4, strategy, inv_update_steps=3)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = specs[:]
        rng.shuffle(shuffled)
        plan = make_plan(shuffled, 4, strategy, inv_update_steps=3)
        assert plan.digest() == ref.digest()
        assert plan.rank_load == ref.rank_load and plan.rank_memory == ref.rank_memory
        assert {la.name: (la.a_owner, la.g_owner, la.grad_workers) for la in plan.layers} == \
               {la.name: (la.a_owner, la.g_owner, la.grad_workers) for la in ref.layers}
        assert [la.name for la in plan.layers] == [s.name for s in shuffled]  # input order is kept for display
    # equal-cost layers are ordered by name: fc1 gets the rank LPT reaches first
    plan = make_plan([LayerSpec(n, 65, 64) for n in ("fc3", "fc1", "fc2")], 3, "dp-kfac", split=False)
    assert [plan.owner(n, "A") for n in ("fc1", "fc2", "fc3")] == [0, 1, 2]


def test_plan_json_round_trip_and_immutability():
    plan = make_plan(_mixed(), 8, "hybrid", grad_worker_fraction=0.25, inv_update_steps=5)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest()
    with pytest.raises(AttributeError):
        plan.world_size = 4  # type: ignore[misc]
    assert isinstance(plan.layers, tuple) and isinstance(plan.rank_load, tuple)


# -- memory cap --------------------------------------------------------------------------------------------------
def _cap_instance() -> list[LayerSpec]:
    # one compute-heavy layer and two memory-heavy, compute-light ones (diagonal A, like embeddings)
    return [LayerSpec("heavy", 6, 6), LayerSpec("emb1", 1000, 2, a_diagonal=True),
            LayerSpec("emb2", 1000, 2, a_diagonal=True)]


def test_memory_cap_is_honoured():
    specs = _cap_instance()
    free = make_plan(specs, 2, "dp-kfac", cost_model=UNIT, split=False)
    emb_bytes = 4 * (1000 + 4 + 1000 + 6)  # diagonal A + G factors, eigenvalues of A + eigen(G) (Q and d)
    assert free.rank_memory[1] == 2 * emb_bytes  # uncapped, LPT puts both light embeddings on rank 1
    capped = make_plan(specs, 2, "dp-kfac", cost_model=UNIT, split=False, memory_cap=10_000)
    assert max(capped.rank_memory) <= 10_000
    assert capped.owner("emb1", "A") != capped.owner("emb2", "A")
    assert capped.makespan >= free.makespan
    for strategy in ("dp-kfac", "mem-opt"):
        auto = make_plan(specs, 2, strategy, cost_model=UNIT, memory_cap=10_000 if strategy == "dp-kfac" else 20_000)
        assert max(auto.rank_memory) <= auto.memory_cap


def test_impossible_memory_cap_raises_clear_error():
    specs = _cap_instance()
    with pytest.raises(ValueError, match="memory_cap"):
        make_plan(specs, 2, "dp-kfac", cost_model=UNIT, memory_cap=5_000)
    with pytest.raises(MemoryCapError, match="memory_cap"):  # comm-opt replicates everything on every rank
        make_plan(specs, 64, "comm-opt", cost_model=UNIT, memory_cap=15_000)
    with pytest.raises(MemoryCapError, match="memory_cap"):  # baselines ignore the cap; the plan still checks it
        make_plan(specs, 2, "dp-kfac", cost_model=UNIT, split=False, memory_cap=8_500, assigner="kaisa-greedy")


# -- more ranks than layers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,kwargs", [("dp-kfac", {}), ("mem-opt", {}), ("comm-opt", {}),
                                             ("hybrid", {"grad_worker_fraction": 0.25})])
def test_world_size_larger_than_number_of_layers(strategy, kwargs):
    specs = _toy() + [LayerSpec("l3", 17, 9)]
    plan = make_plan(specs, 16, strategy, **kwargs)
    used = {la.owner(f) for la in plan.layers for f in "AG"} | {w for la in plan.layers for w in la.grad_workers}
    for r in range(16):
        if r not in used:
            assert plan.rank_load[r] == 0.0 and r in plan.idle_ranks
            assert plan.decompositions_of(r) == ()
    if strategy == "dp-kfac":
        assert len(plan.idle_ranks) >= 16 - 6 and all(plan.rank_memory[r] == 0 for r in plan.idle_ranks)
    if strategy == "comm-opt":
        assert plan.idle_ranks == ()  # every rank preconditions every layer
    assert plan.makespan > 0 and plan.makespan >= plan.lower_bound
    for la in plan.layers:
        for r in range(16):
            assert plan.grad_source(la.name, r) in la.grad_workers


# -- communication -----------------------------------------------------------------------------------------------
def test_comm_bytes_match_hand_computation_on_two_layer_toy():
    # l1: a=3, g=2; l2: a=4, g=5; N=4, fu=2, iu=5, 2-byte communication, colocated factors.
    cm = CostModel(comm_bytes_per_element=2)
    packed = 6 + 3 + 10 + 15        # d(d+1)/2
    dec = 12 + 6 + 20 + 30          # eigen: d^2 + d
    grad = 2 * 3 + 5 * 4            # g * a
    s, n, fu, iu = 2, 4, 2, 5
    expected = {
        "comm-opt": (2 * (n - 1) * s * packed / fu, (n - 1) * s * dec / iu, 0.0),
        "mem-opt": (2 * (n - 1) * s * packed / fu, 0.0, (n - 1) * s * grad),
        "hybrid": (2 * (n - 1) * s * packed / fu, (2 - 1) * s * dec / iu, (n - 2) * s * grad),  # G = 2
        "dp-kfac": ((n - 1) * s * packed / fu, 0.0, (n - 1) * s * grad),
    }
    assert expected["comm-opt"] == (204.0, 81.6, 0.0) and expected["dp-kfac"] == (102.0, 0.0, 156.0)
    for strategy, (fac, dcm, grd) in expected.items():
        plan = make_plan(_toy(), n, strategy, cost_model=cm, factor_update_steps=fu, inv_update_steps=iu,
                         split=False)
        assert plan.comm.factor_reduction == pytest.approx(fac), strategy
        assert plan.comm.decomposition_broadcast == pytest.approx(dcm), strategy
        assert plan.comm.gradient_broadcast == pytest.approx(grd), strategy
        assert plan.comm.total == pytest.approx(fac + dcm + grd)
        assert sum(la.comm.total for la in plan.layers) == pytest.approx(plan.comm.total)
    # inverse method: symmetric inverses are sent packed; diagonal A is sent as a vector
    plan = make_plan([LayerSpec("e", 7, 3, a_diagonal=True)], 3, "comm-opt", method="inverse", split=False)
    assert plan.comm.factor_reduction == 2 * 2 * 4 * (7 + 6)
    assert plan.comm.decomposition_broadcast == 2 * 4 * (7 + 6)
    # a forced split under dp-kfac ships the non-primary decomposition point-to-point to the grad worker
    plan = make_plan(_toy(), n, "dp-kfac", cost_model=cm, inv_update_steps=iu, split=True)
    l1, l2 = plan.layers
    assert not l1.colocated and not l2.colocated
    assert l1.grad_workers == (l1.g_owner,) and l2.grad_workers == (l2.a_owner,)  # the cheaper decomposition
    assert plan.comm.decomposition_broadcast == pytest.approx(s * (12 + 30) / iu)  # l1's QA, l2's QG


def test_dp_kfac_sends_less_than_comm_opt_at_every_step_factor_updates():
    specs = _mixed()
    for n in (2, 8, 64):
        dp = make_plan(specs, n, "dp-kfac", factor_update_steps=1)
        co = make_plan(specs, n, "comm-opt", factor_update_steps=1)
        assert dp.comm.total < co.comm.total
        assert dp.comm.factor_reduction == pytest.approx(co.comm.factor_reduction / 2)
        assert max(dp.rank_memory) < max(co.rank_memory)
    single = make_plan(specs, 1)
    assert single.strategy == "comm-opt" and single.comm.total == 0
    assert single.imbalance == pytest.approx(1.0)


def test_memory_accounting_by_strategy():
    specs = _toy()
    cm = CostModel()
    fac = 4 * (9 + 4 + 16 + 25)
    dec = 4 * (12 + 6 + 20 + 30)
    assert make_plan(specs, 3, "comm-opt", split=False).rank_memory == (fac + dec,) * 3
    assert sum(make_plan(specs, 3, "dp-kfac", split=False).rank_memory) == fac + dec
    mem = make_plan(specs, 3, "mem-opt", split=False).rank_memory
    assert min(mem) == fac and sum(mem) == 3 * fac + dec
    assert cm.factor_elements(5, diagonal=True) == 5 and cm.decomposition_elements(5, method="inverse") == 25


def test_hybrid_follows_kaisa_grid():
    assert grad_worker_columns(8, 4) == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert grad_receiver_rows(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    plan = make_plan(_mixed(), 8, "hybrid", grad_worker_fraction=0.5)
    assert plan.grad_workers_per_layer == 4
    for la in plan.layers:
        assert la.grad_workers in plan.grad_worker_columns()
        assert la.a_owner in la.grad_workers and la.g_owner in la.grad_workers
        for r in range(8):
            src = plan.grad_source(la.name, r)
            assert src in la.grad_workers and src // 2 == r // 2
            assert (r == src) or r in plan.grad_receivers(la.name, src)
        assert plan.decomposition_receivers(la.name, "A") == tuple(w for w in la.grad_workers if w != la.a_owner)
    with pytest.raises(ValueError, match="divide"):
        make_plan(_toy(), 6, "hybrid", grad_worker_fraction=0.7)  # G = 4
    with pytest.raises(ValueError, match="hybrid"):
        make_plan(_toy(), 8, "dp-kfac", grad_worker_fraction=0.5)


def test_baselines_match_their_sources():
    assert round_robin(5, 3) == ((0, 0), (1, 1), (2, 2), (0, 0), (1, 1))
    assert round_robin(3, 8, split=True) == ((0, 1), (2, 3), (4, 5))
    # KAISA: layers by summed cost (stable), group with least summed load, then its least-loaded worker
    work = [(1.0, 1.0), (8.0, 1.0), (8.0, 1.0), (27.0, 8.0)]
    assert kaisa_greedy(work, [[0], [1]], 2) == ((1, 1), (1, 1), (1, 1), (0, 0))
    # not colocated: factors by descending (cost, name), each to the least-loaded worker of the group
    assert kaisa_greedy(work, [[0, 1]], 2, colocate=False) == ((0, 1), (1, 1), (1, 1), (0, 1))
    plan = make_plan([LayerSpec(f"l{i}", 8, 8) for i in range(5)], 2, "dp-kfac", assigner="round-robin")
    assert [la.a_owner for la in plan.layers] == [0, 1, 0, 1, 0]


def test_default_strategy_and_validation():
    assert [default_strategy(n) for n in (1, 2, 8, 9, 1024)] == ["comm-opt"] * 3 + ["dp-kfac"] * 2
    assert make_plan(_toy(), 64).strategy == "dp-kfac"
    with pytest.raises(ValueError, match="unique"):
        make_plan([LayerSpec("x", 2, 2), LayerSpec("x", 3, 3)], 2)
    with pytest.raises(ValueError, match="strategy"):
        make_plan(_toy(), 2, "zero-3")
    with pytest.raises(ValueError):
        LayerSpec("bad", 0, 3)
    with pytest.raises(ValueError, match="world_size"):
        make_plan(_toy(), 0)


# -- calibration, purity, CLI ------------------------------------------------------------------------------------
def test_calibrate_caches_under_kfac_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KFAC_CACHE_DIR", str(tmp_path))
    first = calibrate("cpu", sizes=(16, 32), repeats=1)
    assert first.c_eig > 0 and first.c_inv > 0 and first.c_mm > 0 and first.source.startswith("calibrated cpu")
    cache = tmp_path / "planner_cost_model.json"
    assert cache.is_file() and first.source.split(" ", 1)[1] in json.loads(cache.read_text())["models"]
    assert calibrate("cpu", sizes=(16, 32), repeats=1) == first  # served from the cache
    assert CostModel.from_dict(first.to_dict()) == first
    assert CostModel.default() == CostModel()


def test_planner_is_pure_python_at_plan_time():
    for path in sorted(PLANNER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # no torch.distributed anywhere, not even lazily
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("torch.distributed") for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("torch.distributed"), path
                assert not (node.module == "torch" and any(a.name == "distributed" for a in node.names)), path
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), path
        for node in tree.body:  # module level: no torch / torchvision imports
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("torch", "torchvision") for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in ("torch", "torchvision"), path
                assert not (node.level == 2 and node.module in ("modules", "preconditioner")), path


def _run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "kfac.planner", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _numbers(text: str, label: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


def test_cli_model_compare():
    pytest.importorskip("torchvision")
    out = _run_cli("--model", "resnet18", "--world-size", "8", "--compare")
    for column in ("rank", "load ms/step", "memory MiB", "makespan", "lower bound", "imbalance", "bytes/step",
                   "lpt", "round-robin", "kaisa-greedy"):
        assert column in out
    assert "41 layers" in out
    imbalance = _numbers(out, "imbalance")
    assert len(imbalance) == 3 and all(1.0 <= x < 2.0 for x in imbalance)
    assert imbalance[0] <= min(imbalance[1:])
    makespans, bounds = _numbers(out, "makespan ms/step"), _numbers(out, "lower bound ms/step")
    assert all(m >= b > 0 for m, b in zip(makespans, bounds))
    assert len(re.findall(r"^ +\d+ +\d+\.\d+ ", out, flags=re.M)) == 8  # one row per rank


def test_cli_json_shapes(tmp_path):
    specs = _mixed()
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([s.to_dict() for s in specs]))
    out_json = tmp_path / "plan.json"
    out = _run_cli("--json", str(shapes), "--world-size", "16", "--strategy", "dp-kfac", "--inv-update-steps", "10",
                   "--output", str(out_json))
    plan = make_plan(specs, 16, "dp-kfac", inv_update_steps=10)
    assert f"plan digest {plan.digest()[:16]}" in out
    assert Plan.from_json(out_json.read_text()).digest() == plan.digest()
    for column in ("rank", "load ms/step", "memory MiB", "makespan", "lower bound", "imbalance", "bytes/step"):
        assert column in out
    assert f"imbalance {plan.imbalance:.3f}" in out and "idle ranks" in out


def _brute_force_opt(specs, n, g, cm, iu):
    """Smallest makespan over the planner's whole split search space (exhaustive; tiny instances only)."""
    cols = grad_worker_columns(n, g)
    per_layer = []
    for s in specs:
        da = cm.decomposition_seconds(s.a_dim, diagonal=s.a_diagonal) / iu
        dg = cm.decomposition_seconds(s.g_dim) / iu
        pre = cm.precondition_seconds(s)
        options = []
        for col in cols:
            for a in (col if g > 1 else range(n)):
                for b in (col if g > 1 else range(n)):
                    gw = col if g > 1 else ((a, b)[0 if da < dg else 1],)
                    options.append((a, b, gw))
        per_layer.append((da, dg, pre, options))
    best = float("inf")
    for choice in itertools.product(*(opts for *_, opts in per_layer)):
        load = [0.0] * n
        for (da, dg, pre, _), (a, b, gw) in zip(per_layer, choice):
            load[a] += da
            load[b] += dg
            for w in gw:
                load[w] += pre
        best = min(best, max(load))
    return best


@pytest.mark.parametrize("strategy,n,kwargs", [("dp-kfac", 3, {}), ("comm-opt", 3, {}),
                                               ("hybrid", 4, {"grad_worker_fraction": 0.5})])
def test_lower_bound_is_valid_against_exhaustive_search(strategy, n, kwargs):
    rng = random.Random(99)
    cm = CostModel(c_eig=1.0, c_mm=0.05)
    for _ in range(6):
        specs = [LayerSpec(f"l{i}", rng.randint(1, 6), rng.randint(1, 6)) for i in range(3)]
        plan = make_plan(specs, n, strategy, cost_model=cm, inv_update_steps=2, split=True, **kwargs)
        opt = _brute_force_opt(specs, n, plan.grad_workers_per_layer, cm, 2)
        assert plan.lower_bound <= opt * (1 + 1e-12)
        assert plan.makespan >= opt * (1 - 1e-12)
        assert plan.makespan <= 4 / 3 * opt + 1e-12


def _norm_heavy() -> list[LayerSpec]:
    """Six dense layers and thirty norm-like layers (diagonal A, one output): on 16 dp-kfac ranks some ranks get only
    norm layers, whose load (~1e-10 s/step) is not zero but rounds to 0.000 ms."""
    return [LayerSpec(f"c{i}", 256, 256) for i in range(6)] + [
        LayerSpec(f"n{i}", 64, 1, a_diagonal=True) for i in range(30)]


@pytest.mark.parametrize("specs,n,idle", [(_norm_heavy(), 16, False), (_toy(), 16, True)], ids=["busy", "idle"])
def test_summary_idle_count_agrees_with_least_loaded(specs, n, idle):
    """The header's "idle ranks" (ranks with zero load) and the least-loaded line agree: a rank printed with
    0.000 ms/step is idle, and a rank with work is never printed as 0.000."""
    plan = make_plan(specs, n, "dp-kfac", inv_update_steps=10)
    assert bool(plan.idle_ranks) == idle and (min(plan.rank_load) == 0) == idle
    text = plan.summary(max_ranks=4)
    count = int(re.search(r"idle ranks (\d+)", text).group(1))
    rank, load = re.search(r"least loaded: rank (\d+), (\S+) ms/step", text).groups()
    assert count == len(plan.idle_ranks)
    assert (float(load) == 0) == (count > 0) == (int(rank) in plan.idle_ranks)
    zero_rows = [line for line in text.splitlines() if re.match(r"^ +\d+ +0\.000 ", line)]
    assert len(zero_rows) <= count


def test_cli_compare_min_load_is_zero_only_with_idle_ranks(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([s.to_dict() for s in _norm_heavy()]))
    out = _run_cli("--json", str(shapes), "--world-size", "16", "--strategy", "dp-kfac", "--inv-update-steps", "10",
                   "--max-ranks", "4", "--compare")
    idle = next(line for line in out.splitlines() if line.startswith("idle ranks")).split()[2:]
    least = next(line for line in out.splitlines() if line.startswith("min rank load ms")).split()[4:]
    assert len(idle) == len(least) == 3
    for count, load in zip(idle, least):
        assert (float(load) == 0) == (int(count) > 0), out
    assert "least loaded: rank" in out and ", 0.000 ms/step" not in out
