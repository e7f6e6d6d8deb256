"""What each rank of the distributed benchmark runs: every configuration built and warmed up, then interleaved
timed windows; the rank's report (step end times, bytes, CPU time, memory, rank 0 also the plans)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import kfac
from benchmarks.common import build_model, count_events, gc_paused, log, make_batches, rotated
from benchmarks.cpu.strategies.configs import CONFIGS, KFAC_KWARGS, SGD_KWARGS
from benchmarks.cpu.strategies.counters import ByteCounter, counting_allreduce_hook, system_busy_seconds


class Runner:
    """One configuration on this rank: DDP model, optimizer, byte counters, cursor into the batch pool."""

    def __init__(self, label: str, rank: int, world: int, settings: dict[str, Any],
                 batches: list[tuple[Tensor, Tensor]]) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.label, self.rank, self.per, self.batches = label, rank, settings["per_rank_batch"], batches
        self.model = build_model(settings["quick"], settings["seed"]).train()
        self.ddp = DDP(self.model)
        self.counter = ByteCounter(world)
        self.ddp.register_comm_hook(self.counter, counting_allreduce_hook)
        base = torch.optim.SGD(self.ddp.parameters(), **SGD_KWARGS)
        kw = CONFIGS[label]
        self.pre: kfac.KFACPreconditioner | None = None
        self.opt: torch.optim.Optimizer = base
        if kw is not None:
            self.opt = kfac.KFAC(self.ddp, base, factor_update_steps=settings["factor_update_steps"],
                                 inv_update_steps=settings["inv_update_steps"], **KFAC_KWARGS, **kw)
            self.pre = self.opt.preconditioner
        self.cursor = 0
        self.losses: list[float] = []

    def step(self) -> None:
        x, y = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        lo, hi = self.rank * self.per, (self.rank + 1) * self.per
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.ddp(x[lo:hi]), y[lo:hi])
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))

    def kfac_bytes(self) -> dict[str, float]:
        return dict(self.pre.communicator.bytes_sent) if self.pre is not None else {}


def timed_window(runner: Runner, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings["window"]`` steps between barriers, GC paused: step end times, bytes and CPU deltas."""
    pre = runner.pre
    first = pre.steps if pre is not None else runner.cursor
    bytes_before, ddp_before = runner.kfac_bytes(), runner.counter.bytes
    skipped_before = pre.skipped_steps if pre is not None else 0
    with gc_paused():
        dist.barrier()
        busy0, cpu0 = system_busy_seconds(), time.process_time()
        start = time.monotonic()
        ends = []
        for _ in range(settings["window"]):
            runner.step()
            ends.append(time.monotonic())
        busy1, cpu1 = system_busy_seconds(), time.process_time()
    bytes_after = runner.kfac_bytes()
    rec: dict[str, Any] = {
        "first_step": first, "start": start, "step_ends": ends,
        "ddp_allreduce_bytes": runner.counter.bytes - ddp_before, "process_cpu_seconds": cpu1 - cpu0,
        "system_busy_seconds": None if busy0 is None or busy1 is None else busy1 - busy0,
        "kfac_bytes": {k: bytes_after.get(k, 0.0) - bytes_before.get(k, 0.0)
                       for k in sorted(set(bytes_after) | set(bytes_before))},
    }
    if pre is not None:
        rec.update({"skipped_steps": pre.skipped_steps - skipped_before,
                    "refreshes": count_events(first, settings["window"], settings["inv_update_steps"]),
                    "factor_updates": count_events(first, settings["window"], settings["factor_update_steps"])})
    return rec


def worker(rank: int, world: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Build and warm up every configuration, then time ``repeats`` rounds of one window per configuration
    (the order rotates between rounds, so slow drifts of machine load hit all configurations alike)."""
    batches = make_batches(settings["pool"], settings["per_rank_batch"] * world, settings["seed"] + 1)
    runners = []
    report: dict[str, Any] = {"rank": rank, "threads": torch.get_num_threads(), "configs": {}}
    for label in settings["configs"]:
        runner = Runner(label, rank, world, settings, batches)
        dist.barrier()
        t0 = time.monotonic()
        for _ in range(settings["warmup"]):
            runner.step()
        report["configs"][label] = {"warmup_seconds": time.monotonic() - t0, "windows": []}
        runners.append(runner)
        if rank == 0:
            log(f"  built + warmed up {label:<10s} ({settings['warmup']} step(s) in "
                f"{report['configs'][label]['warmup_seconds']:.1f} s, rank 0 view)")
    for rep in range(settings["repeats"]):
        for runner in rotated(runners, rep):
            rec = timed_window(runner, settings)
            rec["repeat"] = rep
            report["configs"][runner.label]["windows"].append(rec)
            if rank == 0:
                log(f"  repeat {rep + 1}/{settings['repeats']} {runner.label:<10s} steps {rec['first_step']}.."
                    f"{rec['first_step'] + settings['window'] - 1}: {rec['step_ends'][-1] - rec['start']:6.1f} s "
                    "(rank 0 view)")
    for runner in runners:
        rec = report["configs"][runner.label]
        rec.update({"losses": runner.losses,
                    "ddp_buffer_bytes": sum(b.numel() * b.element_size() for b in runner.model.buffers()),
                    "grad_elements": sum(p.numel() for p in runner.model.parameters() if p.requires_grad)})
        pre = runner.pre
        if pre is None:
            continue
        plan = pre.plan
        rec.update({"strategy": plan.strategy, "memory_bytes": pre.memory_usage(), "layers": len(pre.layers)})
        if rank == 0:
            rec["plan"] = {"comm": plan.comm.to_dict(), "rank_memory": list(plan.rank_memory),
                           "rank_load_s": list(plan.rank_load), "makespan_s": plan.makespan,
                           "lower_bound_s": plan.lower_bound, "split": plan.split,
                           "grad_workers_per_layer": plan.grad_workers_per_layer,
                           "factor_update_steps": plan.factor_update_steps,
                           "inv_update_steps": plan.inv_update_steps, "summary": plan.summary(),
                           "owners": {la.name: {"A": la.a_owner, "G": la.g_owner,
                                                "grad_workers": list(la.grad_workers)} for la in plan.layers}}
    return report

