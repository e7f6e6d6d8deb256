"""Distributed K-FAC on gloo: every strategy equals the single-process run on the same global batch (float64).

Each test spawns real processes with a collective timeout and a join deadline, so a bug fails instead of hanging.
"""

import pytest
import torch
import torch.distributed as dist

import kfac

import dist_workers as W

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(240)]

# EK-FAC's corrections are unique only up to rotations inside degenerate eigenspaces (e.g. the never-seen null space
# of a wide A), where eigh's choice differs between summed distributed factors and single-process ones at
# round-off level: the EK-FAC configuration uses the pooled model, whose factors have no such spaces.
EKFAC_CFG = dict(strategy="comm-opt", method="ekfac", pooled=True)
CONFIGS = {
    2: [dict(strategy="comm-opt"), dict(strategy="mem-opt"), dict(strategy="dp-kfac"),
        dict(strategy="dp-kfac", method="inverse"), dict(strategy="hybrid", grad_worker_fraction=0.5),
        dict(strategy="dp-kfac", comm_dtype=torch.float32), dict(strategy="dp-kfac", split_factors=True),
        dict(strategy="comm-opt", split_factors=True), EKFAC_CFG],
    3: [dict(strategy="comm-opt"), dict(strategy="mem-opt", method="inverse"), dict(strategy="dp-kfac"),
        dict(strategy="hybrid", grad_worker_fraction=1 / 3), dict(strategy="mem-opt", split_factors=True),
        dict(strategy="dp-kfac", method="inverse", split_factors=True), EKFAC_CFG],
    4: [dict(strategy="comm-opt", method="inverse"), dict(strategy="dp-kfac"),
        dict(strategy="hybrid", grad_worker_fraction=0.5), dict(strategy="hybrid", grad_worker_fraction=0.5,
                                                                 split_factors=True)],
}
DISTRIBUTED_OPTIONS = ("strategy", "grad_worker_fraction", "factor_reduction", "comm_dtype", "split_factors")


def reference(steps: int = W.STEPS, **cfg) -> list[torch.Tensor]:
    model = W.make_model(pooled=cfg.pop("pooled", False))
    cfg = {k: v for k, v in cfg.items() if k not in DISTRIBUTED_OPTIONS}
    assert cfg.get("method") != "ekfac" or steps > 1 and cfg.get("inv_update_steps", 2) > 1  # corrections apply
    opt = kfac.KFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **{**W.KFAC_KW, **cfg})
    W.train(model, opt, range(steps))
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_strategies_equal_single_process(world, tmp_path):
    configs = CONFIGS[world]
    reports = W.launch(W.equivalence, world, tmp_path, configs)
    for i, cfg in enumerate(configs):
        got = torch.load(tmp_path / f"params{i}.pt")
        want = reference(**cfg)
        # float64 everywhere: equal to 1e-5; with float32 on the wire, to float32 accuracy
        tol = dict(rtol=1e-5, atol=1e-7) if "comm_dtype" not in cfg else dict(rtol=1e-4, atol=1e-5)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{cfg} at world {world}: {m}")
        assert reports[0][str(i)]["strategy"] == cfg["strategy"]
        if cfg.get("split_factors"):
            assert reports[0][str(i)]["split"], cfg
        # from the second factor update on, reductions start during the backward pass
        assert all(r[str(i)]["launched_early"] >= W.STEPS - 1 for r in reports), cfg
    # measured traffic (summed over ranks) equals the plan's prediction: STEPS factor updates and gradient
    # exchanges, and refreshes every inv_update_steps (2: at steps 0, 2, 4)
    for i, cfg in enumerate(configs):
        every = {**W.KFAC_KW, **cfg}["inv_update_steps"]
        refreshes = len(range(0, W.STEPS, every))
        plan = reports[0][str(i)]["plan_comm"]
        total = {k: sum(r[str(i)]["bytes"].get(k, 0.0) for r in reports) for k in ("factors", "decompositions",
                                                                                   "gradients")}
        assert total["factors"] == pytest.approx(plan["factor_reduction"] * W.STEPS, rel=1e-9), cfg
        assert total["gradients"] == pytest.approx(plan["gradient_broadcast"] * W.STEPS, rel=1e-9), cfg
        assert total["decompositions"] == pytest.approx(
            plan["decomposition_broadcast"] * every * refreshes, rel=1e-9), cfg
    # communication: dp-kfac reduces factors to owners instead of all-reducing them and (A, G colocated) never
    # sends decompositions, comm-opt broadcasts decompositions and never gradients; a split dp-kfac plan sends
    # exactly the decompositions of factors owned apart from their layer's grad worker
    by_strategy = {cfg["strategy"]: reports[0][str(i)]["bytes"] for i, cfg in enumerate(configs)
                   if cfg.get("method", "eigen") == "eigen" and "comm_dtype" not in cfg and not reports[0][str(i)]["split"]}
    halved = [i for i, cfg in enumerate(configs) if "comm_dtype" in cfg]
    for i in halved:  # float32 on the wire: half the bytes of the float64 dp-kfac run
        full = next(j for j, c in enumerate(configs) if c == {"strategy": "dp-kfac"})
        for k in ("factors", "gradients"):
            ours = sum(r[str(i)]["bytes"][k] for r in reports)
            ref = sum(r[str(full)]["bytes"][k] for r in reports)
            assert ours == pytest.approx(ref / 2, rel=1e-9)
    if "comm-opt" in by_strategy:
        assert by_strategy["comm-opt"].get("gradients", 0) == 0 and by_strategy["comm-opt"]["decompositions"] > 0
    if "dp-kfac" in by_strategy:
        assert by_strategy["dp-kfac"].get("decompositions", 0) == 0 and by_strategy["dp-kfac"]["gradients"] > 0


def test_dp_kfac_local_factor_reduction_uses_the_owners_shard(tmp_path):
    """factor_reduction='local': no factor traffic; each owner's A is its own shard's A, and its G is its shard's G
    in global-mean-loss units (divided by world_size^2)."""
    world = 3
    results = W.launch(W.local_reduction, world, tmp_path)
    per = W.GLOBAL_BATCH // world
    for rank in range(world):
        model = W.make_model()
        pre = kfac.KFACPreconditioner(model, **{**W.KFAC_KW, "factor_decay": 0.0})
        x, y = W.batch(0)
        torch.nn.functional.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]
                                          ).backward()
        pre.step()
        held = torch.load(tmp_path / f"local_rank{rank}.pt")
        assert results[rank]["factor_bytes"] == 0
        for name, (A, G) in held.items():
            if A is None:
                continue
            torch.testing.assert_close(A, pre.store[name].A)
            torch.testing.assert_close(G, pre.store[name].G / world**2)
    assert sum(1 for r in range(world) for A, _ in torch.load(tmp_path / f"local_rank{r}.pt").values()
               if A is not None) == len(pre.layers)  # every layer held by exactly one rank


def test_non_finite_gradient_on_one_rank_skips_everywhere(tmp_path):
    results = W.launch(W.non_finite_on_one_rank, 2, tmp_path)
    for r in results:
        assert r == {"skipped": 1, "steps": 0, "unchanged": True}


def test_ekfac_outside_comm_opt_fails_clearly(tmp_path):
    results = W.launch(W.ekfac_dp_kfac, 2, tmp_path)
    assert all("needs strategy='comm-opt'" in r["error_message"] for r in results)
    assert all(r["rebuilt"] for r in results)  # no hook left by the failed constructor


def test_ranks_with_different_models_fail_clearly(tmp_path):
    results = W.launch(W.mismatched_models, 2, tmp_path)
    for r in results:
        assert r["error_message"] and "differs between ranks" in r["error_message"]


@pytest.mark.parametrize("strategy", ["dp-kfac", "comm-opt"])
def test_checkpoint_at_world_4_resumes_at_world_2(strategy, tmp_path):
    W.launch(W.checkpoint, 4, tmp_path, "save", 3, strategy)
    W.launch(W.checkpoint, 2, tmp_path, "resume", 3, strategy)
    got = torch.load(tmp_path / "resumed.pt")
    for g, w in zip(got, reference(steps=6)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_float16_wire_keeps_counts_exact_and_factors_in_range(tmp_path):
    """Counts travel exactly and sums travel pre-normalised: float16 on the wire gives the right factors even with
    more rows than float16 can count and sums that would overflow it."""
    rows = 40000  # per rank; 80000 in total > 65504
    results = W.launch(W.half_precision_wire, 2, tmp_path, rows)
    A = torch.tensor(results[0]["A"], dtype=torch.float64)
    G = torch.tensor(results[0]["G"], dtype=torch.float64)
    torch.testing.assert_close(A, torch.full((4, 4), 0.25, dtype=torch.float64))  # inputs are all 0.5
    # output gradient of sum() per row is 1 on each rank = 1/world_size in global-mean units (x1/N^2 convention)
    torch.testing.assert_close(G, torch.full((2, 2), 1.0 / 4, dtype=torch.float64))


@pytest.mark.parametrize("strategy", ["comm-opt", "dp-kfac"])
def test_overlapped_reduction_with_uneven_and_changing_batches(strategy, tmp_path):
    """Each rank's rows differ, and the global row count changes between steps (so the agreed scale of an
    overlapped reduction is not this step's count): A is still the mean over the global batch, and G follows the
    distributed convention G = sum_r g_r^T g_r / (world^2 N)."""
    world = 2
    results = W.launch(W.uneven_batches, world, tmp_path, strategy)
    assert all(r["launched_early"] > 0 and r["buckets"] > 1 for r in results)
    held = [torch.load(tmp_path / f"uneven_rank{r}.pt") for r in range(world)]
    for step, sizes in enumerate(W.UNEVEN):
        x, y = W.batch(step)
        pres, lo = [], 0
        for n in sizes:  # each rank's local statistics, from a single-process run on its rows
            model = W.make_model()
            pre = kfac.KFACPreconditioner(model, **{**W.KFAC_KW, "factor_decay": 0.0, "kl_clip": None})
            torch.nn.functional.cross_entropy(model(x[lo:lo + n]), y[lo:lo + n]).backward()
            pre.step()
            pres.append(pre)
            lo += n
        total = sum(sizes)
        for name in pres[0].layers:
            entries = [pre.store[name] for pre in pres]
            # A_r = a_r^T a_r / rows_r, and every layer has a fixed number of rows per example: weight by examples
            want_a = sum(e.A * n for e, n in zip(entries, sizes)) / total
            want_g = sum(e.G * n for e, n in zip(entries, sizes)) / (world**2 * total)
            for rank in range(world):
                A, G = held[rank][step][name]
                if A is not None:
                    torch.testing.assert_close(A, want_a, msg=lambda m: f"A of {name} at step {step}: {m}")
                if G is not None:
                    torch.testing.assert_close(G, want_g, msg=lambda m: f"G of {name} at step {step}: {m}")


@pytest.mark.parametrize("strategy", ["comm-opt", "dp-kfac"])
@pytest.mark.parametrize("net, layer", [("transformer", "encoder.layers.0.self_attn"), ("group_norm", "1"),
                                        ("tied", "emb")])
def test_layers_beyond_linear_and_conv_on_two_ranks_equal_one_process(net, layer, strategy, tmp_path):
    """nn.MultiheadAttention's captured projections (with LayerNorms), and a GroupNorm whose statistics are
    per-example gradients in A (the reduction's world_size² correction goes to A there), and tied weights (one power
    of world_size on each factor): 2 gloo ranks equal one process on the same global batch (float64)."""
    reports = W.launch(W.net_training, 2, tmp_path, net, strategy)
    model = W.NETS[net]()
    W.train(model, W.make_kfac(model), range(W.STEPS))
    assert layer in reports[0]["layers"]
    for r in reports:
        for got, p in zip(r["params"], model.parameters()):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), p.detach().flatten(), rtol=1e-8,
                                       atol=1e-10)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("strategy", ["comm-opt", "mem-opt"])
def test_replicas_stay_bitwise_identical(strategy, warm, tmp_path):
    """Every rank ends with bit-identical parameters (DDP replicas must not drift apart): each decomposition --
    exact or warm-started -- is computed once by its owner and shared in the layout the receivers get (eigh's
    column-major eigenvectors once made the owner's products round differently); and equal to one process up to
    floating point."""
    reports = W.launch(W.replica_training, 2, tmp_path, strategy, warm)
    for got, want in zip(reports[0]["params"], reports[1]["params"]):
        assert got == want
    model = W.make_model(pooled=True)
    opt = W.make_kfac(model, warm_start=warm)
    W.train(model, opt, range(W.STEPS))
    if warm:
        assert sum(opt.preconditioner.method.warm.counts.values()) > 0
    for got, p in zip(reports[0]["params"], model.parameters()):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), p.detach().flatten(), rtol=1e-6,
                                   atol=1e-8)
