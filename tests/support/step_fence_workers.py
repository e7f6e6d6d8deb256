"""Workers for the step-fence tests (gloo, DDP + kfac.KFAC): a rank that skips ``step()`` or calls it an extra time
must get every rank a clear error within a bounded time, never a hang until the process-group timeout."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac
from dist_workers import GLOBAL_BATCH, KFAC_KW, STEPS, batch, make_model

STEP_TIMEOUT = 3.0  # seconds (the default is 300)
SKIPPED = 2  # the step rank 1 skips


def _rows(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    per = GLOBAL_BATCH // world
    x, y = batch(step)
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def mismatched_steps(rank: int, world: int, out: Path, shape: str) -> dict:
    """``shape``: ``"skip"`` (rank 1 ``continue``s after backward at step 2, then ``opt.zero_grad()``),
    ``"skip_model_zero_grad"`` (the same, but it zeroes the model's gradients, so K-FAC never hears of it) or
    ``"extra"`` (rank 1 calls ``step()`` once more at the end, after a ``no_sync()`` backward)."""
    model = make_model()
    ddp = DDP(model)
    opt = kfac.KFAC(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), step_timeout=STEP_TIMEOUT,
                    **KFAC_KW)
    start = time.monotonic()
    try:
        for step in range(STEPS):
            x, y = _rows(step, rank, world)
            start = time.monotonic()
            (ddp.zero_grad if shape == "skip_model_zero_grad" else opt.zero_grad)()
            F.cross_entropy(ddp(x), y).backward()
            if shape.startswith("skip") and rank == 1 and step == SKIPPED:
                continue  # e.g. after catching an exception on this rank only
            start = time.monotonic()
            opt.step()
        if shape == "extra" and rank == 1:
            x, y = _rows(STEPS, rank, world)
            opt.zero_grad()
            with ddp.no_sync():
                F.cross_entropy(ddp(x), y).backward()
            start = time.monotonic()
            opt.step()
        result: dict = {"error_message": None}
    except Exception as exc:
        result = {"error_message": f"{type(exc).__name__}: {exc}", "runtime_error": isinstance(exc, RuntimeError)}
    result.update(elapsed=time.monotonic() - start, steps=opt.preconditioner.steps)
    if shape == "skip_model_zero_grad":
        # rank 1 waits in DDP's all-reduce for rank 0, which only rank 0's exit releases (as torchrun's would)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        os._exit(0)
    return result


def fence_overhead(rank: int, world: int, out: Path, steps: int) -> dict:
    """Seconds per training step (zero_grad, forward, backward, step) of the same DDP run with and without the step
    fence, and per step() alone (interleaved runs, best of 3)."""
    times: dict[str, list[float]] = {}
    for _ in range(3):
        for key, timeout in (("fence", 300.0), ("none", None)):
            model = make_model(hidden=32)
            ddp = DDP(model)
            opt = kfac.KFAC(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), step_timeout=timeout,
                            **{**KFAC_KW, "inv_update_steps": 10})
            x, y = _rows(0, rank, world)
            in_step = 0.0
            t_all = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                t0 = time.perf_counter()
                opt.step()
                in_step += time.perf_counter() - t0
            times.setdefault(key, []).append((time.perf_counter() - t_all) / steps)
            times.setdefault(key + "_step", []).append(in_step / steps)
    return {k: min(v) for k, v in times.items()}
