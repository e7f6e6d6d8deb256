"""DCP checkpoints of K-FAC carry its whole state across world sizes, plans and wrappers (gloo, float64): saved by
FSDP2 at 4 ranks under a sharded plan (fixed and adaptive K-FAC), resumed by FSDP2 at 2 ranks, by DDP at 2 and by
one process, the next 10 steps equal the uninterrupted single-process run to 1e-10; the checkpoint converts to a ``torch.save`` file
with ``format_utils`` and loads from it."""

import pytest
import torch
import torch.distributed as dist

import dist_workers as D

dcp_workers = pytest.importorskip("dcp_workers", exc_type=ImportError, reason="needs FSDP2 and DCP")
import fsdp_workers as W  # noqa: E402

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(300)]

SAVE_AT, STOP = 5, 15


def reference(kind: str, cfg: dict) -> list[torch.Tensor]:
    model = W.make_model(kind)
    opt = W.make_optimizer(model, {k: v for k, v in cfg.items() if k != "strategy"})
    W.train(model, opt, kind, steps=STOP)
    return [p.detach() for p in model.parameters()]


def close(got, want, tol=1e-10):
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) <= tol, float((g - w).norm() / w.norm())


@pytest.mark.parametrize("kind,method,saver", [("mlp", "eigen", "mem-opt"), ("block", "eigen", "dp-kfac"),
                                               ("block-seq-first", "ekfac", "comm-opt")])
def test_saved_at_4_ranks_resumes_at_2_and_1_and_across_wrappers(kind, method, saver, tmp_path):
    cfg = {"method": method}
    D.launch(dcp_workers.phase, 4, tmp_path, kind, "fsdp", {**cfg, "strategy": saver}, 0, SAVE_AT, None, "ckpt",
             timeout=240)
    want = reference(kind, cfg)
    resumes = [(2, "fsdp", "comm-opt"), (2, "ddp", "mem-opt" if method != "ekfac" else "comm-opt"), (1, "none", None)]
    for world, wrap, strategy in resumes:
        run = {**cfg, **({"strategy": strategy} if strategy else {})}
        reports = D.launch(dcp_workers.phase, world, tmp_path, kind, wrap, run, SAVE_AT, STOP, "ckpt", None,
                           timeout=240)
        assert reports[0]["steps"] == STOP
        close(torch.load(tmp_path / "params_final.pt"), want)


def test_adaptive_state_saved_at_4_ranks_resumes_at_2_and_1(tmp_path):
    """Adaptive K-FAC's λ, counters and last direction (a sharded tensor under each parameter) travel too."""
    cfg = {"adaptive": True}
    D.launch(dcp_workers.phase, 4, tmp_path, "block", "fsdp", {**cfg, "strategy": "mem-opt"}, 0, SAVE_AT, None,
             "ckpt", timeout=240)
    model = W.make_model("block")
    W.adaptive_train(model, "block", steps=STOP)
    want = [p.detach() for p in model.parameters()]
    for world, wrap in ((2, "fsdp"), (1, "none")):
        D.launch(dcp_workers.phase, world, tmp_path, "block", wrap, cfg, SAVE_AT, STOP, "ckpt", None, timeout=240)
        # 1e-9: each of the 15 adaptive steps solves a small linear system, and rounding grows to ~1e-10
        close(torch.load(tmp_path / "params_final.pt"), want, tol=1e-9)


def test_checkpoint_converts_to_torch_save_and_loads_from_it(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import set_state_dict

    D.launch(dcp_workers.phase, 2, tmp_path, "mlp", "fsdp", {"strategy": "mem-opt"}, 0, SAVE_AT, None, "ckpt",
             timeout=240)
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model = W.make_model("mlp")
    opt = W.make_optimizer(model, {})
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.preconditioner.steps == SAVE_AT
    W.train(model, opt, "mlp", steps=STOP, start=SAVE_AT)
    close([p.detach() for p in model.parameters()], reference("mlp", {}))
