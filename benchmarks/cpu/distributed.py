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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import IMAGE, add_raw_argument, count_events, log, machine_info, write_results  # noqa: E402
from benchmarks.cpu.strategies.configs import CONFIGS, KFAC_KWARGS, SGD_KWARGS  # noqa: E402
from benchmarks.cpu.strategies.counters import system_busy_seconds  # noqa: E402
from benchmarks.cpu.strategies.launch import (init_rank_threads, launch, relaunch_with_torchrun,  # noqa: E402
                                        start_watchdog, torchrun_launcher, under_torchrun)
from benchmarks.cpu.strategies.plot import plot, plot_title  # noqa: E402
from benchmarks.cpu.strategies.report import at_scale_summary, format_tables  # noqa: E402
from benchmarks.cpu.strategies.summary import ratio_dp_over_comm_opt, summarise  # noqa: E402
from benchmarks.cpu.strategies.worker import worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RAW_KEYS: tuple[tuple[str, ...], ...] = (("summary", "*", "step_ms"), ("summary", "*", "window_seconds"),
                                         ("summary", "*", "refresh_step_ms_all"), ("raw_per_rank",))
"""Left out of the summary JSON (``--raw`` keeps them): every timed step and window, each rank's raw report.
``--replot`` needs none of them."""



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



def torchrun_rank_main(args: argparse.Namespace) -> int:
    """One rank under torchrun: gloo from env://, :func:`worker`, reports all-gathered, rank 0 summarises."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    watchdog = start_watchdog(args.deadline, rank)
    init_rank_threads(args.threads)
    if world < 2:
        raise SystemExit("this benchmark is about distributed strategies: run it with --nproc-per-node >= 2")
    dist.init_process_group("gloo", init_method="env://", timeout=_dt.timedelta(seconds=args.collective_timeout))
    try:
        launcher = torchrun_launcher(world)
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
        return relaunch_with_torchrun(Path(__file__), argv, world_size=args.world_size, threads=args.threads,
                                      deadline=args.deadline)
    return spawn_main(args)


if __name__ == "__main__":
    sys.exit(main())
