"""DCP checkpoints across world sizes and wrappers, for tests/integration/test_dcp.py (run by
:func:`dist_workers.launch`): one phase of a run -- build the model (FSDP2 ``fully_shard``, DDP or unwrapped) and
K-FAC, optionally resume from a DCP checkpoint, train, optionally save one."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import fsdp_workers as W


def phase(rank: int, world: int, out: Path, kind: str, wrap: str, cfg: dict, start: int, stop: int,
          load: str | None, save: str | None) -> dict:
    """Steps ``start .. stop - 1`` of ``kind`` wrapped by ``wrap`` (``"fsdp"``, ``"ddp"`` or ``"none"``) with
    K-FAC options ``cfg`` (``adaptive``: adaptive K-FAC), resumed from checkpoint ``load`` and saved to ``save`` (folders under ``out``); rank 0
    saves the full final parameters as ``params_<save or 'final'>.pt``."""
    model = W.make_model(kind)
    net = model
    if wrap == "fsdp":
        W.shard(model, (world,))
    elif wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model)
    cfg = dict(cfg)
    adaptive = cfg.pop("adaptive", False)
    opt = W.make_adaptive(net, cfg) if adaptive else W.make_optimizer(net, cfg)
    if load is not None:
        msd, osd = get_state_dict(net, opt)  # a fresh optimizer's skeleton
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(out / load))
        set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if adaptive:
        W.adaptive_train(net, kind, rank, world, steps=stop, start=start, opt=opt)
    else:
        W.train(net, opt, kind, rank, world, steps=stop, start=start)
    if save is not None:
        msd, osd = get_state_dict(net, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / save))
    params = [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    if rank == 0:
        torch.save(params, out / f"params_{save or 'final'}.pt")
    return {"steps": opt.preconditioner.steps, "strategy": opt.preconditioner.plan.strategy}
