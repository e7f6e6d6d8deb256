"""The planner's view of FSDP2 / HSDP models (:mod:`kfac.planner.sharded`): default strategies, one worker per
layer and shard group, memory and traffic next to FSDP's, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kfac.planner import CostModel, LayerSpec, make_plan, sharded_strategy, sharded_view

SPECS = [LayerSpec(f"l{i}", a, g) for i, (a, g) in enumerate([(785, 512), (513, 512), (513, 256), (257, 10),
                                                             (65, 64), (4609, 512)])]


@pytest.mark.parametrize("world,shard,corrects,want", [
    (8, 8, False, ("dp-kfac", None)), (8, 4, False, ("hybrid", 0.25)), (8, 2, False, ("hybrid", 0.5)),
    (4, 4, True, ("comm-opt", None)), (1, 1, False, ("comm-opt", None))])
def test_default_strategy_for_sharded_models(world, shard, corrects, want):
    assert sharded_strategy(world, shard, corrects=corrects) == want


def test_a_mesh_that_does_not_divide_the_world_is_an_error():
    with pytest.raises(ValueError, match="not a multiple of the shard group size"):
        sharded_strategy(6, 4)


@pytest.mark.parametrize("world,shard,strategy", [(4, 4, None), (8, 4, None), (4, 4, "comm-opt"),
                                                  (4, 2, "comm-opt"), (4, 4, "mem-opt")])
def test_every_shard_group_preconditions_every_layer_once_and_traffic_is_two_over_s_of_fsdp(world, shard, strategy):
    default, fraction = sharded_strategy(world, shard)
    plan = make_plan(SPECS, world, strategy or default, grad_worker_fraction=None if strategy else fraction,
                     inv_update_steps=10)
    view = sharded_view(plan, SPECS, shard)
    wire = plan.cost_model.bytes_per_element
    for replica in range(world // shard):
        group = range(replica * shard, replica * shard + shard)
        owned = sorted(n for r in group for n in view.owned[r])
        assert owned == sorted(s.name for s in SPECS)
        for r in group:  # a worker holds its own layers' whole gradients, transiently
            assert view.transient_bytes[r] == sum(s.g_dim * s.a_dim for s in SPECS if s.name in view.owned[r]) * wire
    numel = sum(s.g_dim * s.a_dim for s in SPECS)
    assert view.reduce_scatter_bytes == (world // shard) * (shard - 1) * numel * 4
    headers = (world // shard) * 2 * (shard - 1) * len(SPECS) * wire
    assert view.exchange_bytes - headers == pytest.approx(2 / shard * view.reduce_scatter_bytes * wire / 4)
    assert view.replica_all_reduce_bytes == 2 * (world // shard - 1) * numel * 4


def test_a_plan_with_several_workers_in_a_shard_group_is_refused():
    plan = make_plan(SPECS, 4, "hybrid", grad_worker_fraction=0.5)  # columns {0, 2}, {1, 3}: 2 per group of 4
    with pytest.raises(ValueError, match="grad workers in the shard group"):
        sharded_view(plan, SPECS, 4)


def test_cli_prints_the_fsdp2_view(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([s.to_dict() for s in SPECS]))
    run = subprocess.run([sys.executable, "-m", "kfac.planner", "--json", str(shapes), "--world-size", "8",
                          "--shard-size", "4", "--inv-update-steps", "10"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    plan = make_plan(SPECS, 8, "hybrid", grad_worker_fraction=0.25, inv_update_steps=10,
                     cost_model=CostModel.default())
    view = sharded_view(plan, SPECS, 4)
    assert "FSDP2 view: 2 x 4 mesh (replicas x shard group), strategy hybrid" in run.stdout
    assert f"({view.exchange_bytes / view.reduce_scatter_bytes:.3f}x FSDP's reduce-scatter)" in run.stdout
    for r in range(8):
        assert f"{r:>6} {len(view.owned[r]):>7} {plan.rank_memory[r] / 2**20:>10.2f}" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "kfac.planner", "--json", str(shapes), "--world-size", "6",
                          "--shard-size", "4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a multiple of the shard group size" in bad.stderr
