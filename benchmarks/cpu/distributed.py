"""Distributed K-FAC strategies side by side: step time, bytes on the wire and factor memory, measured on gloo.

Part (a), "real" -- what is measured
    ``--world-size`` (default 4) gloo processes on THIS machine. Launchers (``--launcher``; the JSON records which
    one produced the numbers, under ``launcher``):

    * ``torchrun`` (default): the script re-executes itself as ``python -m torch.distributed.run --standalone
      --nproc-per-node=N --max-restarts=0 --monitor-interval=1 benchmarks/cpu/distributed.py <same args>`` (env
      ``GLOO_SOCKET_IFNAME=lo``, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``; the whole launch is
      killed ``--deadline`` + 120 s after it starts). Detecting torchrun (``TORCHELASTIC_RUN_ID``/``LOCAL_RANK``),
      each rank does ``init_process_group("gloo", timeout=--collective-timeout)`` from ``env://``, runs the
      benchmark, the reports are all-gathered (``all_gather_object``) and rank 0 summarises, prints and writes
      JSON/PNG; the other ranks exit quietly. Each rank aborts itself (exit 124) after ``--deadline`` seconds, and
      torchrun then stops the others, so a hang fails instead of blocking. The same path runs when a user starts
      ``torchrun --standalone --nproc-per-node=4 benchmarks/cpu/distributed.py`` directly (then ``--world-size`` is
      ignored: the world is torchrun's).
    * ``spawn``: this process spawns the ranks itself (``torch.multiprocessing``, one fresh FileStore per launch,
      a collective timeout and a join deadline), collects their reports from files and summarises.

    Each process runs ``torch.set_num_threads(--threads)`` (default 1). Every configuration trains torchvision
    ``resnet18(num_classes=10)`` (``--quick``: a tiny CNN) wrapped in ``DistributedDataParallel`` on 32x32
    SYNTHETIC data (a fixed pool of random global batches, inputs ~ N(0, 1), labels uniform over 10 classes; each
    rank takes its slice: per-rank batch 8, global batch 32). Nothing is learned; only cost is measured.
    Configurations, all living side by side in the same processes, each from the same initial weights:

    * ``sgd``: DDP + ``torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)`` (the baseline, no K-FAC);
    * ``comm-opt``, ``mem-opt``, ``hybrid-0.5`` (``grad_worker_fraction=0.5``), ``dp-kfac``:
      ``kfac.KFAC(ddp_model, <that SGD>, factor_update_steps=F, inv_update_steps=I, damping=1e-3, strategy=...)``.

    Every configuration is built and run for ``--warmup`` untimed steps (step 0 does the initial factor update and
    decomposition); then ``--repeats`` rounds (default 2) each time one window of ``--window`` steps (default
    ``I``) per configuration, in an order that rotates between rounds so that drifts of machine load hit all
    configurations alike. With ``F=1, I=5, warmup=1`` the windows are steps 1..5 and 6..10, each containing exactly
    one refresh (steps 5 and 10) and five factor updates. Each window starts after a barrier; per step we record
    each rank's monotonic end time (all ranks share one machine clock) and take the step's wall time as the latest
    rank's end minus the previous step's latest end. Reported: the median step time over all timed steps (a
    typical step: with one refresh in 5 steps the median excludes it), the mean (timed wall time / steps:
    amortised, refreshes included) and the median refresh step. The CPU time other processes used during the
    windows (``/proc/stat`` minus the ranks' own CPU time) is reported, with a warning when it is not negligible.

    Bytes: ``opt.preconditioner.communicator.bytes_sent`` (float bytes by category; each rank counts its share of the
    wire volume of every collective -- ring all-reduce ``2 (N-1)/N`` payloads, reduce ``(N-1)/N``, broadcast one
    per receiver counted by the source -- so the sum over ranks is the total traffic), differenced across each
    window and summed over ranks and windows, compared per category with the plan's prediction ``plan.comm``
    (bytes per step amortised over the schedule), converted to the timed steps: ``factor_reduction * F`` per
    factor update, ``decomposition_broadcast * I`` per refresh, ``gradient_broadcast`` per step. The library
    buckets the factor reductions and launches them asynchronously during the backward pass on a private process
    group (``kfac/reduction.py``); bytes are counted when a bucket is launched, inside the timed step. With
    ``split_factors=None`` (the default used here) the planner may put a layer's ``A`` and ``G`` on different
    ranks; for single-grad-worker strategies (mem-opt, dp-kfac) the decomposition of the factor owned apart from
    the layer's grad worker then goes point to point once per refresh -- counted under "decompositions", and
    modelled by the plan's ``decomposition_broadcast`` (``|grad workers - {owner}|`` copies). Categories the plan
    does not model (``factor_counts``: the per-bucket row counts all-reduced beside the factors; ``control``:
    status flags riding with decompositions and gradients; ``corrections``/``correction_counts``: EK-FAC only,
    not run here) are shown as "other". The DDP gradient all-reduce, which every configuration pays, is measured
    with a DDP communication hook (the stock ``allreduce_hook`` wrapped to count its buckets with the same ring
    convention).

    Memory: ``opt.preconditioner.memory_usage()`` (bytes of factors and decompositions this rank holds) after the
    last window (which ends with a refresh, so decompositions are present), max and sum over ranks, next to the
    plan's ``rank_memory``.

Caveats
    * 4 single-threaded processes on a 2-core machine are OVERSUBSCRIBED (the script prints the core count): the
      absolute ms/step are meaningless for a real cluster, and how the OS shares 2 cores among 4 ranks (some
      computing, some waiting in a collective) shapes the numbers. The point is the bytes (exact, independent of
      speed) and the relative costs.
    * gloo over loopback is memory bandwidth, not a network: time spent communicating is underestimated relative to
      a real interconnect.
    * Not counted anywhere: DDP's per-step broadcast of BatchNorm buffers from rank 0 (``broadcast_buffers=True``;
      its size is computed and stored in the JSON), the 4-byte all-reduce of K-FAC's "gradients finite" flag, and
      DDP's construction-time parameter broadcast.
    * ResNet-18 at N=4 with the default cost model: the planner splits A and G of three layer4 convolutions
      (A: 4608x4608, G: 512x512) in comm-opt, mem-opt and dp-kfac. For mem-opt/dp-kfac the three A
      eigendecompositions then travel point to point to the rank that owns the G factors and preconditions those
      layers (about 243 MiB per refresh, 48.6 MiB/step at I=5), and that rank holds them: its memory is the
      per-rank maximum. The plan predicts this (bytes and memory match it exactly); it is the planner's choice
      (a 1.4% lower predicted makespan), not a counting artefact.
    * Decompositions in the warm-up use running factors close to their identity initialisation; ``eigh`` on the
      dense factors of a long run is somewhat slower.
    * Few timed steps (``repeats x window`` = 10 per configuration by default): enough for the relative picture on
      an idle machine, not for small differences. Keeping every configuration alive at once costs memory (about
      2 GB of factors and decompositions per rank for ResNet-18).

Part (b), "at scale"
    A short summary of ``benchmarks/cpu/results/planner_scale.json`` (produced by ``benchmarks/cpu/planner_scale.py``,
    the planner's cost model, not measured): dp-kfac/comm-opt bytes per step and makespan / lower bound for
    ResNet-50 at N = 8, 64, 256, and the comm-opt/dp-kfac communication and computation ratios at N = 64 next to
    the DP-KFAC paper's 2.79-3.15x and 1.55-1.65x. Nothing is recomputed here.

Outputs: a table on stdout, ``<out-dir>/distributed.json`` (default ``<out-dir>``: ``benchmarks/cpu/results``;
launcher, machine info and load, settings, per configuration the step-time statistics, bytes by category measured
and predicted, memory per rank and the plan; ``--raw [PATH]`` also writes the complete record with every timed step
and each rank's raw report) and ``<out-dir>/distributed.png``. ``--quick`` (tiny CNN, ``I=2``, a few seconds) writes
``distributed_quick.{json,png}`` (raw data included) instead, leaving the real results alone. The results in
``benchmarks/cpu/results/`` were produced by the default torchrun launcher (re-executed by this script; see
``launcher`` in the JSON); earlier versions of this benchmark used the spawn launcher.

    python benchmarks/cpu/distributed.py                   # ResNet-18 via torchrun, ~5 minutes on an idle 2-core VM
    python benchmarks/cpu/distributed.py --quick           # smoke test
    python benchmarks/cpu/distributed.py --launcher spawn  # the same, ranks spawned by torch.multiprocessing
    torchrun --standalone --nproc-per-node=4 benchmarks/cpu/distributed.py   # what the default launcher runs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (IMAGE, add_raw_argument, build_model, count_events, machine_info,  # noqa: E402
                               make_batches, save_png, write_results)

import kfac  # noqa: E402

SGD_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
KFAC_KWARGS: dict[str, float] = {"damping": 1e-3}  # factor_decay, kl_clip: kfac defaults (0.95, 1e-3)
# label -> KFAC keyword arguments (None: plain SGD baseline)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "sgd": None,
    "comm-opt": {"strategy": "comm-opt"},
    "mem-opt": {"strategy": "mem-opt"},
    "hybrid-0.5": {"strategy": "hybrid", "grad_worker_fraction": 0.5},
    "dp-kfac": {"strategy": "dp-kfac"},
}
PLAN_CATEGORIES: dict[str, str] = {  # bytes_sent category -> Plan.comm field
    "factors": "factor_reduction", "decompositions": "decomposition_broadcast", "gradients": "gradient_broadcast"}
RESULTS = Path(__file__).resolve().parent / "results"
RAW_KEYS: tuple[tuple[str, ...], ...] = (("summary", "*", "step_ms"), ("summary", "*", "window_seconds"),
                                         ("summary", "*", "refresh_step_ms_all"), ("raw_per_rank",))
"""Left out of the summary JSON (``--raw`` keeps them): every timed step and window, each rank's raw report.
``--replot`` needs none of them."""


def byte_unit(largest: float) -> tuple[str, float]:
    """("MiB", 2**20) for sizes of a MiB or more, else ("KiB", 1024): keeps the tiny --quick model readable."""
    return ("MiB", 2.0**20) if largest >= 2.0**20 else ("KiB", 1024.0)


# ----------------------------------------------------------------------------------------------------------
# model, data
# ----------------------------------------------------------------------------------------------------------




def system_busy_seconds() -> float | None:
    """CPU seconds all cores of this machine spent busy since boot (``/proc/stat``), or ``None`` off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ByteCounter:
    """State of the counting DDP comm hook: this rank's share of the all-reduce wire volume (ring convention)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.bytes = 0.0
        self.buckets = 0


def counting_allreduce_hook(state: ByteCounter, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's stock ``allreduce_hook`` (mean over ranks), counting ``2 (N-1)/N`` bucket payloads per rank."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size() * 2 * (state.world_size - 1) / state.world_size
    state.buckets += 1
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


# DDP checks a hook's annotations by identity; with postponed (string) annotations it would reject this one.
counting_allreduce_hook.__annotations__.update(state=ByteCounter, bucket=dist.GradBucket,
                                               **{"return": torch.futures.Future[Tensor]})


# ----------------------------------------------------------------------------------------------------------
# worker (one per rank)
# ----------------------------------------------------------------------------------------------------------
def _entry(rank: int, world: int, out_dir: str, store: str, settings: dict[str, Any]) -> None:
    out = Path(out_dir)
    torch.set_num_threads(settings["threads"])
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=settings["collective_timeout"]))
    try:
        result: dict[str, Any] = worker(rank, world, settings)
    except Exception:  # noqa: BLE001 -- reported to the parent through the result file
        result = {"error": traceback.format_exc()}
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / f"rank{rank}.json")
    try:  # orderly teardown: nobody leaves while a peer still talks to it
        dist.barrier()
    finally:
        dist.destroy_process_group()


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
    gc.collect()
    gc.disable()
    try:
        dist.barrier()
        busy0, cpu0 = system_busy_seconds(), time.process_time()
        start = time.monotonic()
        ends = []
        for _ in range(settings["window"]):
            runner.step()
            ends.append(time.monotonic())
        busy1, cpu1 = system_busy_seconds(), time.process_time()
    finally:
        gc.enable()
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
        k = rep % len(runners)
        for runner in runners[k:] + runners[:k]:
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


def launch(world: int, settings: dict[str, Any], deadline_s: float) -> list[dict[str, Any]]:
    """Run :func:`worker` on ``world`` gloo processes; return each rank's report (raise on failure/deadline)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(settings["threads"]))  # inherited by the spawned processes
    os.environ.setdefault("MKL_NUM_THREADS", str(settings["threads"]))
    with tempfile.TemporaryDirectory(prefix="kfac_dist_bench_") as tmp:
        out = Path(tmp)
        store = out / f"pg_store_{uuid.uuid4().hex}"  # a FileStore file must be fresh for each process group
        ctx = mp.start_processes(_entry, args=(world, str(out), str(store), settings), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"benchmark did not finish within --deadline {deadline_s:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        reports = []
        for r in range(world):
            path = out / f"rank{r}.json"
            if not path.exists():
                raise RuntimeError(f"rank {r} wrote no result")
            data = json.loads(path.read_text())
            if "error" in data:
                raise RuntimeError(f"rank {r} failed:\n{data['error']}")
            reports.append(data)
    return reports


# ----------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------
def summarise(reports: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configuration: step times, bytes per step (measured, predicted), memory."""
    fu, iu, window, cores = (settings["factor_update_steps"], settings["inv_update_steps"], settings["window"],
                             settings["usable_cores"])
    rows = []
    for label in settings["configs"]:
        recs = [rep["configs"][label] for rep in reports]
        step_s: list[float] = []      # every timed step of every window
        refresh_s: list[float] = []   # the steps among them that refreshed decompositions
        window_s: list[float] = []
        measured: dict[str, float] = {}
        ddp_bytes = cpu_ranks = busy = 0.0
        busy_known = True
        n_fu = n_ref = skipped = 0
        for w in range(settings["repeats"]):
            wins = [r["windows"][w] for r in recs]
            start = max(x["start"] for x in wins)  # latest rank through the barrier; all share one clock
            ends = [max(x["step_ends"][i] for x in wins) for i in range(window)]
            steps = [b - a for a, b in zip([start] + ends[:-1], ends)]
            step_s += steps
            refresh_s += [t for i, t in enumerate(steps) if (wins[0]["first_step"] + i) % iu == 0]
            window_s.append(ends[-1] - start)
            for x in wins:
                for k, v in x["kfac_bytes"].items():
                    measured[k] = measured.get(k, 0.0) + v
                ddp_bytes += x["ddp_allreduce_bytes"]
                cpu_ranks += x["process_cpu_seconds"]
            if wins[0]["system_busy_seconds"] is None:
                busy_known = False
            else:
                busy += wins[0]["system_busy_seconds"]  # rank 0's view of the whole machine over (about) the window
            n_fu += wins[0].get("factor_updates", 0)
            n_ref += wins[0].get("refreshes", 0)
            skipped += sum(x.get("skipped_steps", 0) for x in wins)
        total_steps = window * settings["repeats"]
        row: dict[str, Any] = {
            "config": label, "kfac": CONFIGS[label] is not None, "timed_steps": total_steps,
            "step_ms": [1e3 * t for t in step_s], "window_seconds": window_s,
            "ms_per_step_median": 1e3 * statistics.median(step_s),
            "ms_per_step_mean": 1e3 * sum(window_s) / total_steps,
            "ms_per_step_max": 1e3 * max(step_s), "ms_per_step_min": 1e3 * min(step_s),
            "warmup_seconds_max": max(r["warmup_seconds"] for r in recs),
            "ddp_allreduce_bytes_per_step": ddp_bytes / total_steps,
            "ddp_buffer_broadcast_bytes_per_step_computed": (len(recs) - 1) * recs[0]["ddp_buffer_bytes"],
            "grad_elements": recs[0]["grad_elements"], "final_loss_rank0": recs[0]["losses"][-1],
            "cpu_seconds_ranks": cpu_ranks,
            "kfac_bytes_per_step": {k: v / total_steps for k, v in sorted(measured.items())},
            "kfac_bytes_per_step_total": sum(measured.values()) / total_steps,
        }
        if busy_known:
            foreign = max(0.0, busy - cpu_ranks)
            row["cpu_seconds_other_processes"] = foreign
            row["other_processes_share_of_machine"] = foreign / (sum(window_s) * cores)
        if row["kfac"]:
            r0 = recs[0]
            plan = r0["plan"]
            pred = {"factors": plan["comm"]["factor_reduction"] * fu * n_fu,
                    "decompositions": plan["comm"]["decomposition_broadcast"] * iu * n_ref,
                    "gradients": plan["comm"]["gradient_broadcast"] * total_steps}
            mem = [r["memory_bytes"] for r in recs]
            row.update({
                "predicted_bytes_per_step": {k: v / total_steps for k, v in pred.items()},
                "predicted_bytes_per_step_total": sum(pred.values()) / total_steps,
                "plan_comm_amortised": plan["comm"],
                "measured_over_predicted": {k: (measured.get(k, 0.0) / v if v else
                                                (None if measured.get(k, 0.0) else 1.0)) for k, v in pred.items()},
                "other_bytes_per_step": {k: v / total_steps for k, v in measured.items() if k not in PLAN_CATEGORIES},
                "strategy": r0["strategy"], "factor_updates_timed": n_fu, "refreshes_timed": n_ref,
                "skipped_steps": skipped, "layers": r0["layers"],
                "memory_bytes_per_rank": mem, "memory_bytes_max": max(mem), "memory_bytes_sum": sum(mem),
                "predicted_memory_bytes_per_rank": plan["rank_memory"],
                "predicted_memory_bytes_max": max(plan["rank_memory"]),
                "plan_makespan_s": plan["makespan_s"], "plan_lower_bound_s": plan["lower_bound_s"],
                "plan_split": plan["split"], "grad_workers_per_layer": plan["grad_workers_per_layer"],
                "plan_summary": plan["summary"], "plan_owners": plan["owners"],
                "refresh_step_ms": 1e3 * statistics.median(refresh_s) if refresh_s else None,
                "refresh_step_ms_all": [1e3 * t for t in refresh_s],
            })
        rows.append(row)
    base = next((r for r in rows if r["config"] == "sgd"), None)
    for r in rows:
        if base is not None:
            r["median_vs_sgd"] = r["ms_per_step_median"] / base["ms_per_step_median"]
            r["mean_vs_sgd"] = r["ms_per_step_mean"] / base["ms_per_step_mean"]
    return rows


def ratio_dp_over_comm_opt(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    by = {r["config"]: r for r in rows}
    if "dp-kfac" not in by or "comm-opt" not in by:
        return None
    dp, co = by["dp-kfac"], by["comm-opt"]
    return {
        "kfac_bytes_measured": dp["kfac_bytes_per_step_total"] / co["kfac_bytes_per_step_total"],
        "kfac_bytes_predicted": dp["predicted_bytes_per_step_total"] / co["predicted_bytes_per_step_total"],
        "including_ddp_allreduce_measured": ((dp["kfac_bytes_per_step_total"] + dp["ddp_allreduce_bytes_per_step"])
                                             / (co["kfac_bytes_per_step_total"] + co["ddp_allreduce_bytes_per_step"])),
        "max_rank_memory": dp["memory_bytes_max"] / co["memory_bytes_max"],
    }


def format_tables(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    mu, md = byte_unit(max([r["memory_bytes_max"] for r in rows if r["kfac"]], default=0))
    bu, bd = byte_unit(max(r["kfac_bytes_per_step_total"] + r["ddp_allreduce_bytes_per_step"] for r in rows))
    lines = [(f"Step time over {settings['repeats']} window(s) of {settings['window']} steps per config: median step, "
             f"mean step (= window time / steps, refreshes included), median refresh step; K-FAC memory per rank "
             f"(max, plan's max, sum over ranks):"),
             (f"{'config':<11s} {'median ms':>10s} {'mean ms':>9s} {'refresh ms':>11s} {'med/SGD':>8s} "
             f"{'mean/SGD':>9s} {'mem max ' + mu:>12s} {'(plan)':>8s} {'mem sum ' + mu:>12s}"),
             "-" * 98]
    for r in rows:
        ref = f"{r['refresh_step_ms']:11.0f}" if r.get("refresh_step_ms") is not None else f"{'-':>11s}"
        mem = (f"{r['memory_bytes_max'] / md:12.1f} {r['predicted_memory_bytes_max'] / md:8.1f} "
               f"{r['memory_bytes_sum'] / md:12.1f}") if r["kfac"] else f"{'-':>12s} {'-':>8s} {'-':>12s}"
        vs = (f"{r['median_vs_sgd']:7.2f}x {r['mean_vs_sgd']:8.2f}x" if "median_vs_sgd" in r
              else f"{'-':>8s} {'-':>9s}")
        lines.append(f"{r['config']:<11s} {r['ms_per_step_median']:10.0f} {r['ms_per_step_mean']:9.0f} {ref} {vs} "
                     f"{mem}")
    lines += ["",
              (f"Bytes per step, all ranks together, {bu}: measured (plan prediction) -- K-FAC traffic by category, "
              "then the DDP gradient all-reduce every config pays:"),
              (f"{'config':<11s} {'factors':>17s} {'decompositions':>17s} {'gradients':>17s} {'other':>7s} "
              f"{'K-FAC total':>17s} {'DDP allred':>11s} {'all':>8s}"),
              "-" * 113]
    for r in rows:
        m = r["kfac_bytes_per_step"]
        p = r.get("predicted_bytes_per_step", {})
        cells = []
        for k in PLAN_CATEGORIES:
            cells.append(f"{m.get(k, 0.0) / bd:8.1f} ({p[k] / bd:6.1f})" if k in p else f"{'-':>17s}")
        other = sum(v for k, v in m.items() if k not in PLAN_CATEGORIES)
        tot = (f"{r['kfac_bytes_per_step_total'] / bd:8.1f} ({r['predicted_bytes_per_step_total'] / bd:6.1f})"
               if r["kfac"] else f"{0.0:8.1f} {'':7s}")
        ddp = r["ddp_allreduce_bytes_per_step"]
        lines.append(f"{r['config']:<11s} {' '.join(cells)} {other / bd:7.3f} {tot} {ddp / bd:11.1f} "
                     f"{(ddp + r['kfac_bytes_per_step_total']) / bd:8.1f}")
    lines.append("('other' = categories the plan does not model: factor_counts (row counts all-reduced with the "
                 "factors) and control (status flags))")
    split = []
    for r in rows:
        if r["kfac"] and r.get("plan_owners"):
            apart = [n for n, o in r["plan_owners"].items() if o["A"] != o["G"]]
            if apart:
                p2p = r["grad_workers_per_layer"] == 1
                split.append(f"{r['config']} {len(apart)} layer(s)"
                             + (" (the far factor's decomposition goes point to point each refresh)" if p2p else
                                " (within the grad-worker column: no extra traffic)"))
    if split:
        lines.append("A and G owned by different ranks (planner split): " + "; ".join(split))
    shares = {r["config"]: r["other_processes_share_of_machine"] for r in rows
              if r.get("other_processes_share_of_machine") is not None}
    if shares:
        # /proc/stat has 10 ms ticks: ignore shares that amount to less than half a core-second
        busy = any(v > 0.05 and r.get("cpu_seconds_other_processes", 0.0) > 0.5
                   for r in rows for k, v in shares.items() if r["config"] == k)
        lines.append(("WARNING: other processes used the CPU during the timed windows (timings contaminated): "
                      if busy else "CPU used by other processes during the timed windows: ")
                     + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()) + " of the machine")
    mism = [(r["config"], k, v) for r in rows if r["kfac"] for k, v in r["measured_over_predicted"].items()
            if v is None or abs(v - 1) > 1e-6]
    lines.append("measured / predicted per category: " + (
        "all equal to 1 (within 1e-6)" if not mism else
        "MISMATCH: " + ", ".join(f"{c}/{k}={'inf' if v is None else f'{v:.6f}'}" for c, k, v in mism)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# part (b): at scale, from planner_scale.json
# ----------------------------------------------------------------------------------------------------------
def at_scale_summary(path: Path, model: str = "resnet50", world_sizes: tuple[int, ...] = (8, 64, 256)
                     ) -> tuple[dict[str, Any] | None, str]:
    pointer = "(planner cost model, not measured; recompute with: python benchmarks/cpu/planner_scale.py)"
    if not path.exists():
        return None, f"Part (b): {path} not found; run python benchmarks/cpu/planner_scale.py to produce it."
    data = json.loads(path.read_text())
    ratios: dict[int, dict[int, float]] = {}
    for r in data.get("dp_over_comm_opt_bytes_fu1", []):
        if r["model"] == model and r["world_size"] in world_sizes:
            ratios.setdefault(r["world_size"], {})[r["inv_update_steps"]] = r["ratio"]
    strategies = ("dp-kfac/lpt", "comm-opt/lpt", "mem-opt/lpt", "hybrid-0.5/lpt")
    imb: dict[int, dict[str, float]] = {}
    for r in data.get("rows", []):
        if r["model"] == model and r["world_size"] in world_sizes and r["config"] in strategies:
            imb.setdefault(r["world_size"], {})[r["config"]] = r["imbalance"]
    ius = sorted({k for v in ratios.values() for k in v})
    shown = path.resolve().relative_to(REPO_ROOT) if path.resolve().is_relative_to(REPO_ROOT) else path
    lines = [f"Part (b), at scale: {model} from {shown} {pointer}",
             (f"  dp-kfac / comm-opt bytes per step (factor_update_steps=1) and makespan / lower bound of the LPT plans "
             f"(fu={data.get('factor_update_steps')}, iu={data.get('inv_update_steps')}):"),
             f"  {'N':>5s} " + " ".join(f"{'bytes iu=' + str(i):>13s}" for i in ius) + " "
             + " ".join(f"{s.split('/')[0] + ' mk/LB':>16s}" for s in strategies)]
    for n in world_sizes:
        if n not in ratios and n not in imb:
            continue
        lines.append(f"  {n:>5d} " + " ".join(f"{ratios.get(n, {}).get(i, float('nan')):13.3f}" for i in ius) + " "
                     + " ".join(f"{imb.get(n, {}).get(s, float('nan')):16.3f}" for s in strategies))
    summary = {"source": str(shown), "model": model, "note": pointer,
               "cost_model": (data.get("cost_model") or {}).get("source"),
               "fu_iu_of_rows": [data.get("factor_update_steps"), data.get("inv_update_steps")],
               "dp_over_comm_opt_bytes_fu1": {str(n): {str(i): v for i, v in d.items()} for n, d in ratios.items()},
               "makespan_over_lower_bound": {str(n): d for n, d in imb.items()}}
    paper = data.get("vs_dp_kfac_paper")
    if paper:
        p = paper["paper"]
        lines.append(f"  vs the DP-KFAC paper at N={p['world_size']} ({p['communication_reduction'][0]}-"
                     f"{p['communication_reduction'][1]}x less communication, {p['computation_reduction'][0]}-"
                     f"{p['computation_reduction'][1]}x less computation than D-KFAC = our comm-opt), fu=1, "
                     f"cost model {summary['cost_model']}: comm-opt / dp-kfac")
        vs: dict[str, Any] = {}
        for m in dict.fromkeys(r["model"] for r in paper["rows"]):
            for meth in dict.fromkeys(r["method"] for r in paper["rows"]):
                rs = sorted((r for r in paper["rows"] if r["model"] == m and r["method"] == meth
                             and r["world_size"] == p["world_size"]), key=lambda r: r["inv_update_steps"])
                if not rs:
                    continue
                vs[f"{m}/{meth}"] = {str(r["inv_update_steps"]): {"communication": r["communication_ratio"],
                                                                  "computation": r["computation_ratio"]} for r in rs}
                lines.append(f"    {m + ' ' + meth:<19s} bytes " + " ".join(
                    f"iu={r['inv_update_steps']}: {r['communication_ratio']:.2f}x" for r in rs) + " | makespan "
                    + " ".join(f"iu={r['inv_update_steps']}: {r['computation_ratio']:.2f}x" for r in rs))
        summary["vs_dp_kfac_paper_at_paper_n"] = vs
    return summary, "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"] for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))

    ax = axes[0]
    med = [r["ms_per_step_median"] for r in rows]
    mean = [r["ms_per_step_mean"] for r in rows]
    w = 0.38
    ax.bar([x - w / 2 for x in xs], med, w, label="median step (typical)", color="tab:blue")
    ax.bar([x + w / 2 for x in xs], mean, w, label="mean step (amortised, incl. refresh)", color="tab:orange")
    for x, m in zip(xs, mean):
        ax.annotate(f"{m:.0f}", (x + w / 2, m), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(xs, labels, rotation=15)
    ax.set_ylabel("ms / step (oversubscribed: relative only)")
    ax.set_title("wall time per step")
    ax.set_ylim(0, max(mean + med) * 1.25)
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1]
    bu, bd = byte_unit(max(r["kfac_bytes_per_step_total"] + r["ddp_allreduce_bytes_per_step"] for r in rows))
    cats = [("factors", "K-FAC factors", "tab:blue"), ("decompositions", "K-FAC decompositions", "tab:green"),
            ("gradients", "K-FAC precond. gradients", "tab:red")]
    bottom = [0.0] * len(rows)
    for key, name, color in cats:
        vals = [r["kfac_bytes_per_step"].get(key, 0.0) / bd for r in rows]
        ax.bar(xs, vals, 0.6, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    other = [sum(v for k, v in r["kfac_bytes_per_step"].items() if k not in PLAN_CATEGORIES) / bd for r in rows]
    ax.bar(xs, other, 0.6, bottom=bottom, label="K-FAC other (counts, flags)", color="tab:gray")
    bottom = [b + v for b, v in zip(bottom, other)]
    ddp = [r["ddp_allreduce_bytes_per_step"] / bd for r in rows]
    ax.bar(xs, ddp, 0.6, bottom=bottom, label="DDP gradient all-reduce", color="tab:purple", alpha=0.6)
    top = [b + d for b, d in zip(bottom, ddp)]
    pred = [(x, (r["predicted_bytes_per_step_total"] + r["ddp_allreduce_bytes_per_step"]) / bd)
            for x, r in zip(xs, rows) if r["kfac"]]
    if pred:
        ax.scatter([p[0] for p in pred], [p[1] for p in pred], marker="_", s=600, color="black", zorder=5,
                   label="plan prediction (+ DDP)")
    for x, t in zip(xs, top):
        ax.annotate(f"{t:.0f}" if t >= 100 else f"{t:.3g}", (x, t), textcoords="offset points", xytext=(0, 2),
                    ha="center", fontsize=7)
    ax.set_xticks(xs, labels, rotation=15)
    ax.set_ylabel(f"{bu} / step, sum over ranks")
    ax.set_title("bytes on the wire per step (measured)")
    ax.set_ylim(0, max(top) * 1.6)
    ax.legend(fontsize=7, loc="upper right", ncol=2)

    ax = axes[2]
    krows = [r for r in rows if r["kfac"]]
    mu, md = byte_unit(max([r["memory_bytes_max"] for r in krows], default=0))
    kx = list(range(len(krows)))
    ax.bar(kx, [r["memory_bytes_max"] / md for r in krows], 0.6, color="tab:cyan", label="max over ranks (measured)")
    ax.scatter(kx, [r["predicted_memory_bytes_max"] / md for r in krows], marker="_", s=600, color="black",
               zorder=5, label="plan prediction (max)")
    for x, r in zip(kx, krows):
        ax.annotate(f"{r['memory_bytes_max'] / md:.0f}\n(sum {r['memory_bytes_sum'] / md:.0f})",
                    (x, r["memory_bytes_max"] / md), textcoords="offset points", xytext=(0, 2), ha="center",
                    fontsize=7)
    ax.set_xticks(kx, [r["config"] for r in krows], rotation=15)
    ax.set_ylabel(mu)
    ax.set_title("K-FAC factors + decompositions per rank\n(bar, label: max over ranks; sum over ranks)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(0, max(r["memory_bytes_max"] for r in krows) / md * 1.3 if krows else 1)

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def plot_title(result: dict[str, Any]) -> str:
    st, m = result["settings"], result["machine"]
    sub = "OVERSUBSCRIBED" if result["oversubscribed"] else "not oversubscribed"
    launcher = (result.get("launcher") or {}).get("name", "spawn")
    return (f"{result['model']}: DDP + kfac.KFAC strategies, {st['world_size']} gloo ranks ({launcher}) x "
            f"{st['threads']} thread "
            f"on {result['usable_cores']} cores ({sub}), per-rank batch {st['per_rank_batch']}, "
            f"F={st['factor_update_steps']}, I={st['inv_update_steps']}, "
            f"{st['repeats']} x {st['window']} timed steps, synthetic data\n{m['cpu_model']}, torch {m['torch']}, "
            f"{m['date_utc']}")


def replot(args: argparse.Namespace) -> int:
    """Print the tables and redraw the PNG from an existing JSON (no processes are launched)."""
    suffix = "_quick" if args.quick else ""
    json_path = args.out_dir / f"distributed{suffix}.json"
    result = json.loads(json_path.read_text())
    rows = result["summary"]
    log(format_tables(rows, result["settings"]))
    png_path = args.out_dir / f"distributed{suffix}.png"
    plot(rows, png_path, title=plot_title(result))
    log(f"wrote {png_path} (from {json_path})")
    return 0


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", choices=("torchrun", "spawn"), default="torchrun",
                   help="torchrun (default): re-execute this script under python -m torch.distributed.run "
                        "--standalone; spawn: torch.multiprocessing from this process. Ignored when already "
                        "running under torchrun")
    p.add_argument("--world-size", type=int, default=None,
                   help="gloo processes (default 4; under torchrun: its --nproc-per-node)")
    p.add_argument("--per-rank-batch", type=int, default=8, help="per-rank batch (default 8)")
    p.add_argument("--factor-update-steps", "-F", type=int, default=1, help="F (default 1)")
    p.add_argument("--inv-update-steps", "-I", type=int, default=None, help="I (default 5; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per configuration (default 1: step 0, the initial factor update and refresh)")
    p.add_argument("--window", type=int, default=None,
                   help="timed steps per window (default I: one refresh per window)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed windows per configuration, interleaved across configurations (default 2)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to run (default all; 'sgd' is the baseline)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--pool", type=int, default=4, help="synthetic global batches in the cycled pool (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collective-timeout", type=float, default=600.0,
                   help="gloo collective timeout in seconds (default 600)")
    p.add_argument("--deadline", type=float, default=1800.0,
                   help="kill every process after this many seconds (default 1800)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny CNN, I=2; writes distributed_quick.{json,png}")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", action="store_true",
                   help="only print the tables and redraw the PNG from the existing JSON (with --quick: the quick one)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    add_raw_argument(p, "distributed[_quick]")
    p.add_argument("--scale-json", type=Path, default=None,
                   help="planner_scale results for part (b) (default <out-dir>/planner_scale.json)")
    args = p.parse_args(argv)
    if args.inv_update_steps is None:
        args.inv_update_steps = 2 if args.quick else 5
    if args.window is None:
        args.window = args.inv_update_steps
    for name in ("per_rank_batch", "factor_update_steps", "inv_update_steps", "window", "repeats",
                 "threads", "pool"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first K-FAC step does the initial factor update and refresh)")
    if args.world_size is not None and args.world_size < 2:
        p.error("--world-size must be >= 2 (this benchmark is about distributed strategies)")
    if args.scale_json is None:
        args.scale_json = args.out_dir / "planner_scale.json"
    return args


def under_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (``torch.distributed.run`` sets these variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def prepare(args: argparse.Namespace, world: int, launcher: dict[str, Any]
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings shared by every rank and machine information; prints the header and checks the machine is idle
    (sleeps 1 s). Runs in the spawn parent, or on torchrun's rank 0 while the other ranks wait."""
    info = machine_info(gloo_available=dist.is_gloo_available())
    info["load_average_start"] = os.getloadavg()
    cores = info["usable_cores"] or info["logical_cores"] or 1
    model_desc = "tiny CNN (quick smoke test)" if args.quick else "torchvision resnet18(num_classes=10)"
    fu, iu, window = args.factor_update_steps, args.inv_update_steps, args.window
    settings = {
        "quick": args.quick, "world_size": world, "per_rank_batch": args.per_rank_batch,
        "global_batch": args.per_rank_batch * world, "factor_update_steps": fu, "inv_update_steps": iu,
        "warmup": args.warmup, "window": window, "repeats": args.repeats, "configs": args.configs,
        "threads": args.threads, "pool": args.pool, "seed": args.seed, "collective_timeout": args.collective_timeout,
        "usable_cores": cores, "launcher": launcher["name"], "model_desc": model_desc,
    }
    windows = [(args.warmup + w * window, args.warmup + (w + 1) * window - 1) for w in range(args.repeats)]
    per_window = [(count_events(a, window, iu), count_events(a, window, fu)) for a, _ in windows]
    log(f"{model_desc}, DDP + gloo, {world} processes x {args.threads} thread(s) launched by {launcher['name']}, "
        f"per-rank batch {args.per_rank_batch} (global {settings['global_batch']}), {IMAGE}x{IMAGE}, float32, CPU, "
        f"SYNTHETIC random data (timing/bytes only)")
    log(f"schedule F={fu}, I={iu}; per config: {args.warmup} warm-up step(s) (untimed), then {args.repeats} timed "
        f"window(s), interleaved across configs: "
        + ", ".join(f"steps {a}..{b} ({r} refresh(es), {f} factor update(s))"
                    for (a, b), (r, f) in zip(windows, per_window)))
    if any(r != 1 for r, _ in per_window):
        log("NOTE: not every timed window contains exactly one refresh (choose --window = I and --warmup 1)")
    busy = world * args.threads
    if busy > cores:
        log(f"WARNING: OVERSUBSCRIBED: {busy} busy threads on {cores} usable core(s) ({info['cpu_model']}): absolute "
            f"ms/step are inflated and not representative of a cluster; compare bytes and relative costs only.")
    b0 = system_busy_seconds()
    time.sleep(1.0)
    b1 = system_busy_seconds()
    # over 1 s, this process idle (under torchrun the other ranks wait in a collective meanwhile)
    info["busy_cores_before_start"] = None if b0 is None or b1 is None else b1 - b0
    if info["busy_cores_before_start"] is not None and info["busy_cores_before_start"] > 0.25:
        log(f"WARNING: {info['busy_cores_before_start']:.2f} cores busy just before starting (load average "
            f"{info['load_average_start'][0]:.2f}): other processes are using the CPU, timings will be noisier")
    return settings, info


def finish(args: argparse.Namespace, settings: dict[str, Any], info: dict[str, Any], launcher: dict[str, Any],
           reports: list[dict[str, Any]], elapsed: float) -> int:
    """Summarise every rank's report: tables on stdout, JSON and PNG (the spawn parent, or torchrun's rank 0)."""
    suffix = "_quick" if args.quick else ""
    info["load_average_end"] = os.getloadavg()
    fu, iu = settings["factor_update_steps"], settings["inv_update_steps"]
    busy, cores = settings["world_size"] * settings["threads"], settings["usable_cores"]
    rows = summarise(reports, settings)
    ratio = ratio_dp_over_comm_opt(rows)

    log("")
    log(format_tables(rows, settings))
    if ratio is not None:
        log(f"dp-kfac / comm-opt, K-FAC bytes per step: measured {ratio['kfac_bytes_measured']:.3f} (plan "
            f"{ratio['kfac_bytes_predicted']:.3f}); including the DDP all-reduce "
            f"{ratio['including_ddp_allreduce_measured']:.3f}; "
            f"max per-rank K-FAC memory {ratio['max_rank_memory']:.3f}")
    skipped = {r["config"]: r["skipped_steps"] for r in rows if r.get("skipped_steps")}
    if skipped:
        log(f"WARNING: K-FAC skipped steps (non-finite) in the window: {skipped}")
    log(f"(part (a) took {elapsed:.0f} s wall, launcher: {launcher['name']}; load average at start "
        f"{info['load_average_start'][0]:.2f}, at end {info['load_average_end'][0]:.2f})")
    scale, scale_text = at_scale_summary(args.scale_json)
    log("")
    log(scale_text)

    result: dict[str, Any] = {
        "benchmark": "distributed K-FAC strategies on gloo: step time, bytes, memory",
        "description": __doc__,
        "data": "SYNTHETIC: random N(0,1) inputs, uniform random labels (timing/bytes only)",
        "model": settings["model_desc"], "image_size": IMAGE, "dtype": "float32", "device": "cpu", "backend": "gloo",
        "launcher": launcher,
        "sgd": SGD_KWARGS, "kfac": {**KFAC_KWARGS, "factor_update_steps": fu, "inv_update_steps": iu},
        "configs": {k: CONFIGS[k] for k in settings["configs"]},
        "settings": settings, "machine": info,
        "oversubscribed": busy > cores, "busy_threads": busy, "usable_cores": cores,
        "elapsed_seconds": elapsed,
        "summary": rows, "dp_kfac_over_comm_opt": ratio, "at_scale": scale,
        "raw_per_rank": [{"rank": rep["rank"], "threads": rep["threads"],
                          "configs": {k: {kk: vv for kk, vv in v.items() if kk != "plan"}
                                      for k, v in rep["configs"].items()}} for rep in reports],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"distributed{suffix}.json"
    log("")
    write_results(json_path, result, RAW_KEYS, raw=args.raw, embed_raw=args.quick, indent=1, default=str)
    if not args.no_plot:
        png_path = args.out_dir / f"distributed{suffix}.png"
        plot(rows, png_path, title=plot_title(result))
        log(f"wrote {png_path}")
    return 0


def spawn_main(args: argparse.Namespace) -> int:
    """``--launcher spawn``: this process spawns the ranks (torch.multiprocessing) and summarises."""
    launcher = {"name": "spawn", "how": "torch.multiprocessing.start_processes(start_method='spawn'), FileStore "
                "rendezvous, started by benchmarks/cpu/distributed.py"}
    settings, info = prepare(args, args.world_size, launcher)
    t0 = time.monotonic()
    reports = launch(args.world_size, settings, args.deadline)
    return finish(args, settings, info, launcher, reports, time.monotonic() - t0)


def torchrun_command(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The command that re-executes this script under torchrun (``python -m torch.distributed.run``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world_size}",
            "--max-restarts=0", "--monitor-interval=1", str(Path(__file__).resolve()), *argv]


def relaunch_with_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """``--launcher torchrun`` (default) outside torchrun: run this script again under torchrun, wait for it
    (killing the whole launch after ``--deadline`` plus a grace period) and return its exit status. The ranks do
    all the work; rank 0 prints and writes the results."""
    cmd = torchrun_command(args, argv)
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               KFAC_BENCH_RELAUNCHED="1")
    log("launching: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # own process group: killable as a whole
    limit = args.deadline + 120.0  # the ranks' own watchdog fires at --deadline; this catches a stuck launcher
    try:
        rc = proc.wait(timeout=limit)
    except BaseException as exc:  # timeout or Ctrl-C: take down torchrun and its ranks (our process group)
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if isinstance(exc, subprocess.TimeoutExpired):
            raise TimeoutError(f"torchrun launch did not finish within {limit:.0f} s") from None
        raise
    if rc != 0:
        log(f"torchrun exited with status {rc}")
    return rc


def _start_watchdog(seconds: float, rank: int) -> threading.Timer:
    """Abort this rank (exit status 124) after ``seconds``: torchrun then stops the others (max-restarts=0)."""
    def fire() -> None:
        sys.stderr.write(f"rank {rank}: benchmark did not finish within --deadline {seconds:.0f} s, aborting\n")
        sys.stderr.flush()
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def torchrun_rank_main(args: argparse.Namespace) -> int:
    """One rank under torchrun: gloo from env://, :func:`worker`, reports all-gathered, rank 0 summarises."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    watchdog = _start_watchdog(args.deadline, rank)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if world < 2:
        raise SystemExit("this benchmark is about distributed strategies: run it with --nproc-per-node >= 2")
    dist.init_process_group("gloo", init_method="env://", timeout=_dt.timedelta(seconds=args.collective_timeout))
    try:
        launcher = {
            "name": "torchrun",
            "how": ("python -m torch.distributed.run --standalone (c10d rendezvous, env://), "
                    + ("re-executed by benchmarks/cpu/distributed.py --launcher torchrun"
                       if os.environ.get("KFAC_BENCH_RELAUNCHED") == "1" else "invoked directly by the user")),
            "relaunched_by_script": os.environ.get("KFAC_BENCH_RELAUNCHED") == "1",
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "world_size": world,
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            "max_restarts": os.environ.get("TORCHELASTIC_MAX_RESTARTS"),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME",
                                                   "MASTER_ADDR")},
        }
        box: list[Any] = [None]
        if rank == 0:
            if args.world_size is not None and args.world_size != world:
                log(f"NOTE: --world-size {args.world_size} ignored: torchrun started {world} processes")
            box[0] = prepare(args, world, launcher)
        dist.broadcast_object_list(box, src=0)
        settings, info = box[0]
        t0 = time.monotonic()
        report = worker(rank, world, settings)
        reports: list[Any] = [None] * world
        dist.all_gather_object(reports, report)
        elapsed = time.monotonic() - t0
        rc = finish(args, settings, info, launcher, reports, elapsed) if rank == 0 else 0
        dist.barrier()  # orderly teardown: nobody leaves while a peer still talks to it
    finally:
        dist.destroy_process_group()
        watchdog.cancel()
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if under_torchrun():
        return torchrun_rank_main(args)
    if args.world_size is None:
        args.world_size = 4
    if args.launcher == "torchrun":
        return relaunch_with_torchrun(args, argv)
    return spawn_main(args)


if __name__ == "__main__":
    sys.exit(main())
