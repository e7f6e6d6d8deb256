"""K-FAC on FSDP2 (``fully_shard``) and HSDP models, gloo on CPU, float64: after 5 steps the full parameters equal
the single-process run on the same global batch to 1e-10 (relative), on an MLP with uneven shards, a CNN with
GroupNorm and a transformer block in both layouts; no rank forms a layer's whole gradient unless it preconditions that layer, and what each rank
receives is exactly its own layers' gradients plus its rows of the others' results."""

import pytest
import torch
import torch.distributed as dist

import kfac
from kfac.planner import sharded_strategy

import dist_workers as D

fsdp_workers = pytest.importorskip("fsdp_workers", exc_type=ImportError, reason="needs FSDP2 (torch >= 2.4)")

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(300)]

CASES = {  # (model, mesh): configs
    ("mlp", (2,)): [dict(strategy="comm-opt"), dict(strategy="mem-opt", method="inverse"),
                    dict(), dict(method="ekfac")],  # the defaults for sharded models: dp-kfac, comm-opt (EK-FAC)
    ("cnn", (2,)): [dict(), dict(method="ekfac")],  # EK-FAC leaves the GroupNorms out (no per-example rows)
    ("cnn", (2, 2)): [dict(strategy="comm-opt", method="inverse")],
    ("mlp", (4,)): [dict(strategy="comm-opt"), dict(strategy="mem-opt", reshard_after_forward=False)],
    ("block", (2,)): [dict(strategy="mem-opt"), dict(strategy="comm-opt", method="ekfac")],
    ("block-seq-first", (4,)): [dict(strategy="mem-opt"), dict(strategy="comm-opt", method="ekfac")],
    ("block", (2, 2)): [dict(), dict(method="ekfac"),  # defaults on HSDP: hybrid (one worker per group), comm-opt
                        dict(strategy="hybrid", grad_worker_fraction=0.5, method="inverse", reshard_after_forward=False)],
}
DISTRIBUTED_OPTIONS = ("strategy", "grad_worker_fraction", "reshard_after_forward")


def reference(kind: str, cfg: dict) -> list[torch.Tensor]:
    model = fsdp_workers.make_model(kind)
    opt = fsdp_workers.make_optimizer(model, {k: v for k, v in cfg.items() if k not in DISTRIBUTED_OPTIONS})
    fsdp_workers.train(model, opt, kind)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("kind,mesh", list(CASES), ids=[f"{k}-{'x'.join(map(str, m))}" for k, m in CASES])
def test_sharded_training_equals_single_process(kind, mesh, tmp_path):
    configs = CASES[(kind, mesh)]
    world = 1
    for m in mesh:
        world *= m
    reports = D.launch(fsdp_workers.equivalence, world, tmp_path, kind, list(mesh), configs, timeout=240)
    for i, cfg in enumerate(configs):
        got = torch.load(tmp_path / f"params{i}.pt")
        want = reference(kind, cfg)
        for g, w in zip(got, want):
            assert float((g - w).norm() / w.norm()) <= 1e-10, (cfg, float((g - w).norm() / w.norm()))
        ranks = [r[str(i)] for r in reports]
        assert ranks[0]["sharded"] == sorted(ranks[0]["layers"]), "every tracked layer is sharded"
        default = sharded_strategy(world, mesh[-1], corrects=cfg.get("method") == "ekfac")[0]
        for r in ranks:
            assert r["strategy"] == cfg.get("strategy", default)
            owned = {n for n, w in r["workers"].items() if w == r["position"]}
            assert set(r["formed"]) == owned, "a rank forms whole gradients of its own layers only"
            # per step: the gather brings each owned layer's whole gradient, the scatter this rank's rows of
            # every layer behind a (flag, dot) header -- never another layer's whole gradient or parameter
            gather = sum(r["layer_numel"][n] for n in owned)
            scatter = sum(r["local_numel"][n] + 2 for n in r["layers"])
            assert r["received_per_call"] == [gather, scatter] * fsdp_workers.STEPS
            if r["strategy"] in ("mem-opt", "dp-kfac", "hybrid"):  # decompositions of its own layers only
                assert set(r["decompositions"]) <= owned
        # each shard group forms every layer exactly once
        groups = {tuple(r["members"]) for r in ranks}
        for members in groups:
            formed = [n for r in ranks if tuple(r["members"]) == members for n in r["formed"]]
            assert sorted(formed) == sorted(ranks[0]["layers"])


def test_bf16_parameters_with_fp32_reduction_stay_finite_and_close_to_fp32(tmp_path):
    reports = D.launch(fsdp_workers.mixed_precision, 2, tmp_path, "block", timeout=240)
    assert reports[0]["skipped"] == 0 and all(torch.isfinite(torch.tensor(r["losses"])).all() for r in reports)
    got = torch.load(tmp_path / "params_bf16.pt")
    model = fsdp_workers.make_model("block").float()
    opt = fsdp_workers.make_optimizer(model, {"factor_dtype": torch.float32})
    fsdp_workers.train(model, opt, "block", steps=fsdp_workers.STEPS)
    for g, w in zip(got, model.parameters()):
        assert torch.isfinite(g).all()
        assert float((g.float() - w.detach()).norm() / w.detach().norm()) < 0.05


def test_mfac_outside_a_shard_group_is_a_clear_error(tmp_path):
    said = D.launch(fsdp_workers.refusals, 2, tmp_path, timeout=120)[0]
    assert said["mfac-group"].startswith("M-FAC on a sharded model works within one shard group")


MFAC_CONFIGS = [dict(num_grads=3, damping=1e-2, blocks="global", kl_clip=1e-2),
                dict(num_grads=3, damping=1e-2, blocks="per_layer")]


@pytest.mark.parametrize("kind,mesh", [("mlp", (2,)), ("cnn", (2,)), ("block-seq-first", (4,)), ("block", (2, 2))])
def test_mfac_on_a_sharded_model_equals_one_process(kind, mesh, tmp_path):
    D.launch(fsdp_workers.mfac_equivalence, mesh[0] * (mesh[1] if len(mesh) > 1 else 1), tmp_path, kind, list(mesh),
             MFAC_CONFIGS, timeout=240)
    for i, cfg in enumerate(MFAC_CONFIGS):
        model = fsdp_workers.make_model(kind)
        opt = kfac.MFAC(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **cfg)
        fsdp_workers.train(model, opt, kind)
        for g, w in zip(torch.load(tmp_path / f"mfac{i}.pt"), model.parameters()):
            assert float((g - w.detach()).norm() / w.detach().norm()) <= 1e-10, cfg


@pytest.mark.parametrize("kind,method,batches", [("mlp", "ekfac", 5), ("block-seq-first", "ekfac", 4),
                                                 ("block", "kfac", 3)])
def test_influence_on_a_sharded_model_equals_one_process(kind, method, batches, tmp_path):
    from kfac.influence import ClassificationTask, InfluenceAnalyzer

    reports = D.launch(fsdp_workers.influence, 2, tmp_path, kind, method, batches, timeout=240)
    got = torch.load(tmp_path / "influence.pt")
    model = fsdp_workers.make_model(kind)
    train, queries = fsdp_workers.influence_data(kind, batches)
    an = InfluenceAnalyzer(model, ClassificationTask(), method=method, factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False)
    an.fit(train)
    assert reports[0]["layers"] == an.layers
    for key, want in (("pairwise", an.pairwise_scores(queries, train)), ("self", an.self_scores(train))):
        assert float((got[key] - want).norm() / want.norm()) <= 1e-10, key


@pytest.mark.parametrize("kind", ["lm", "lm-seq-first"])
def test_per_token_influence_on_a_sharded_language_model_equals_one_process(kind, tmp_path):
    from kfac.influence import CausalLMTask, InfluenceAnalyzer

    reports = D.launch(fsdp_workers.lm_influence, 2, tmp_path, kind, 3, timeout=240)
    got = torch.load(tmp_path / "per_token.pt")
    model = fsdp_workers.make_model(kind)
    train, queries = fsdp_workers.lm_data(3)
    an = InfluenceAnalyzer(model, CausalLMTask(), method="ekfac", factor_dtype=torch.float64,
                           score_dtype=torch.float64, progress=False)
    an.fit(train)
    want = an.per_token_scores(queries, train)
    assert reports[0]["layers"] == an.layers and got.shape == want.shape == (2, 12, 6)
    assert float((got - want).norm() / want.norm()) <= 1e-10
