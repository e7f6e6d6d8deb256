"""Per-step wall-time overhead of ``kfac.KFAC`` over plain SGD on CPU.

What is measured
    Wall time of complete training steps (``zero_grad``, forward, cross-entropy loss, backward, optimizer
    ``step``) of torchvision ``resnet18(num_classes=10)`` on 32x32 inputs (``--image-size``), batch 32, float32,
    CPU, for:

    * ``sgd``: ``torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``;
    * ``eigen`` / ``inverse``: ``kfac.KFAC`` around that same SGD (``damping=1e-3, factor_decay=0.95,
      kl_clip=1e-3``), with ``method="eigen"`` or ``method="inverse"``,

    at each schedule ``(factor_update_steps, inv_update_steps)`` in ``{(1, 10), (10, 100)}``.

    * ``kaisa-eigen`` / ``kaisa-inverse`` (only with ``--kaisa PATH``, a checkout of gpauloski/kfac-pytorch):
      KAISA's ``KFACPreconditioner`` with the same settings (``lr`` for its KL clip, ``compute_method`` EIGEN or
      INVERSE, its other defaults) around the same SGD, same model weights and batches. KAISA's package is also
      named ``kfac``, so it runs in a worker process (``kaisa_worker.py``) that the benchmark drives window by
      window, interleaved with the others exactly like them (never two timed windows at once). The table then
      gives ours / KAISA per schedule and method. Without ``--kaisa`` the comparison is skipped (said so).

    The data are SYNTHETIC: a fixed pool of random batches (inputs ~ N(0, 1), labels uniform over the 10
    classes), generated once before timing and cycled. Nothing is learned; only time is measured.

How
    Every configuration (schedule x method, SGD included) gets its own identically initialised model and
    optimizer, all living in this one process. Each is warmed up first (``--warmup`` steps; K-FAC's first
    step performs the initial factor update and decomposition, which is excluded from timing). Then, for
    each repeat, every configuration in turn (the order rotates between repeats) runs one timed window of
    ``--periods`` full schedule periods, i.e. ``periods * inv_update_steps`` consecutive steps. Any such
    window contains exactly ``periods`` decomposition refreshes and ``periods * inv / factor`` factor
    updates, so ``window time / steps`` is the honest amortised per-step cost. Because the configurations
    are interleaved, slow drifts of machine load hit all of them alike. We report, per configuration, the
    median and minimum ms/step over repeats and the ratio of the K-FAC median to the SGD median of the same
    schedule (plus the median of per-repeat paired ratios in the JSON).

    Caveat: decomposition cost depends somewhat on the factors' spectra; a short warm-up leaves the running
    factors close to their identity initialisation, on which ``eigh`` is ~10-25 % faster than on the dense
    factors of a long training run, so the refresh share measured here is, if anything, a slight
    underestimate.

Cost
    One (10, 100) eigen window is 100 ResNet-18 steps at ~1-3 s each on 2 cores (preconditioning with the
    4608x4608 eigenbases of layer4 dominates) and every eigen refresh is ~30-45 s (three 4608x4608 ``eigh``),
    so the default (``--repeats 2 --periods 1``) takes roughly 12 minutes on an idle 2-core machine; more
    with ``--threads 1`` or on a busy machine.

``--profile`` additionally breaks a few steps of the ``(10, 100)`` eigen configuration into phases by
wrapping methods of that one optimizer instance from the outside (``kfac/`` is not modified): forward +
backward, factor statistics computed in the hooks, factor update, eigendecomposition refresh,
preconditioning, base optimizer step and the remaining K-FAC bookkeeping, and amortises them over the
schedule.

Outputs: a table on stdout, ``<out-dir>/step_overhead.json`` (default ``<out-dir>``: ``benchmarks/cpu/results``;
settings, machine info, the summary table and the profile; ``--raw [PATH]`` also writes the complete record with
every timed window) and ``<out-dir>/step_overhead.png`` (ratio vs SGD per schedule and method). ``--quick`` runs a
tiny CNN smoke configuration and writes ``step_overhead_quick.{json,png}`` (raw windows included) instead, leaving
the real results alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import IMAGE, add_raw_argument, log, machine_info, make_batches, write_results  # noqa: E402
from benchmarks.cpu.overhead.configs import (BATCH, KAISA_REFERENCE, KFAC_KWARGS, QUICK_SCHEDULES,  # noqa: E402
                                             SCHEDULES, SGD_KWARGS, TRUNCATE, make_configs)
from benchmarks.cpu.overhead.plot import plot, plot_title  # noqa: E402
from benchmarks.cpu.overhead.profile import format_profile, run_profile  # noqa: E402
from benchmarks.cpu.overhead.timing import format_table, run_benchmark, summarise  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RAW_KEYS: tuple[tuple[str, ...], ...] = (("raw",),)
"""Left out of the summary JSON (``--raw`` keeps them): every timed window, per configuration."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed windows per configuration (default 2; 1 with --quick)")
    p.add_argument("--periods", type=int, default=1,
                   help="schedule periods (inv_update_steps steps each) per timed window (default 1)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per configuration before timing (default 1: the step with the initial "
                        "factor update and refresh, which is thereby excluded)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads (default torch.get_num_threads())")
    p.add_argument("--pool", type=int, default=32, help="synthetic batches in the cycled pool (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncate", type=float, default=None,
                   help="add eigen-truncated configurations (method='eigen', truncate=this epsilon) beside eigen; the "
                        "profile then uses it")
    p.add_argument("--image-size", type=int, default=IMAGE,
                   help=f"input height and width (default {IMAGE}; 64 and above make every ResNet-18 factor dense)")
    p.add_argument("--schedules", nargs="+", default=None, metavar="F,I",
                   help="schedules (factor_update_steps,inv_update_steps) to time (default 1,10 10,100)")
    p.add_argument("--kaisa", type=Path, default=None, metavar="PATH",
                   help="a checkout of gpauloski/kfac-pytorch (the directory holding its kfac/ package): also time "
                        "KAISA's eigen and inverse methods side by side (skipped without it)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: small CNN, schedules (1,2) and (2,4), 1 repeat; writes *_quick.* outputs")
    p.add_argument("--profile", action="store_true",
                   help="also print/store a phase breakdown of eigen K-FAC at (10,100) ((2,4) with --quick)")
    p.add_argument("--profile-steps", type=int, default=20, help="steps profiled with --profile (default 20)")
    p.add_argument("--no-bench", action="store_true", help="skip the timing benchmark (e.g. with --profile)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=None, help="file stem of the JSON/PNG (default: step_overhead, or "
                                                "step_overhead_quick with --quick), e.g. step_overhead_64_profile")
    add_raw_argument(p, "step_overhead[_quick]")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first K-FAC step does the initial refresh)")
    if args.kaisa is not None and not (args.kaisa / "kfac" / "preconditioner.py").is_file():
        p.error(f"--kaisa {args.kaisa}: no kfac/preconditioner.py there (expected a checkout of gpauloski/kfac-pytorch)")
    try:
        args.schedules = tuple(tuple(int(v) for v in s.split(",")) for s in args.schedules) if args.schedules else None
    except ValueError:
        p.error("--schedules takes pairs like 1,10")
    if args.schedules and any(len(s) != 2 or min(s) < 1 for s in args.schedules):
        p.error("--schedules takes pairs of positive ints like 1,10")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.repeats < 1 or args.periods < 1 or args.threads < 1 or args.pool < 1 or args.profile_steps < 1:
        p.error("--repeats, --periods, --threads, --pool and --profile-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    schedules = args.schedules or (QUICK_SCHEDULES if args.quick else SCHEDULES)
    suffix = "_quick" if args.quick else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(torch_threads=torch.get_num_threads())
    info["load_average_start"] = os.getloadavg()
    model_desc = "tiny CNN (quick smoke test)" if args.quick else "torchvision resnet18(num_classes=10)"
    log(f"{model_desc}, batch {BATCH}, {args.image_size}x{args.image_size}, float32, CPU ({info['cpu_model']}, "
        f"{args.threads} threads), SYNTHETIC random data; load average {info['load_average_start']}")
    busy = info["load_average_start"][0]
    if busy > 0.5:
        log(f"WARNING: load average {busy:.2f} before starting: other processes are using the CPU, timings will be "
            f"noisy; with more threads than free cores, OpenMP/LAPACK calls can slow down by orders of magnitude "
            f"(consider --threads 1)")
    batches = make_batches(args.pool, BATCH, args.seed, args.image_size)
    if args.truncate is not None:
        TRUNCATE["truncate"] = args.truncate
    configs = make_configs(schedules, kaisa=args.kaisa is not None)
    if args.kaisa is None:
        log("KAISA comparison skipped: pass --kaisa PATH (a checkout of gpauloski/kfac-pytorch) to time it side by side")

    result: dict[str, Any] = {
        "benchmark": "kfac step overhead vs SGD",
        "description": __doc__,
        "data": "SYNTHETIC: random N(0,1) inputs, uniform random labels (timing only)",
        "model": model_desc, "batch_size": BATCH, "image_size": args.image_size, "dtype": "float32", "device": "cpu",
        "sgd": SGD_KWARGS, "kfac": KFAC_KWARGS,
        "settings": {"repeats": args.repeats, "periods": args.periods, "warmup": args.warmup,
                     "threads": args.threads, "pool": args.pool, "seed": args.seed, "quick": args.quick,
                     "truncate": args.truncate, "schedules": [list(s) for s in schedules]},
        "machine": info,
        "kaisa_reference_ratio_vs_sgd": {
            "note": "reported reference for KAISA/kfac-pytorch, eigen method, ResNet-18, same 2-core machine "
                    "class; NOT measured in this run",
            **{f"({f},{i})": v for (f, i), v in KAISA_REFERENCE.items()}},
    }
    rows: list[dict[str, Any]] = []
    if not args.no_bench:
        raw, origin = run_benchmark(configs, batches, repeats=args.repeats, periods=args.periods,
                                    warmup=args.warmup, quick=args.quick, seed=args.seed, kaisa=args.kaisa,
                                    threads=args.threads)
        rows = summarise(configs, raw)
        result["summary"] = rows
        result["raw"] = raw
        if origin:
            result["kaisa"] = {**origin, "settings": {**KFAC_KWARGS, "lr": SGD_KWARGS["lr"]},
                               "note": "measured side by side in this run (worker process, interleaved windows)"}
            del result["kaisa_reference_ratio_vs_sgd"]
        log("\n" + format_table(rows))
        if not args.quick and not origin:
            log("KAISA reference (reported, NOT measured in this run), eigen: "
                + ", ".join(f"({f},{i}) {v:g}x SGD" for (f, i), v in KAISA_REFERENCE.items()))
    if args.profile:
        prof = run_profile(batches, steps=args.profile_steps, quick=args.quick, seed=args.seed,
                           schedule=schedules[-1])
        result["profile"] = prof
        log("\n" + format_profile(prof))
    info["load_average_end"] = os.getloadavg()

    stem = args.name or f"step_overhead{suffix}"
    json_path = args.out_dir / f"{stem}.json"
    log("")
    write_results(json_path, result, RAW_KEYS, raw=args.raw, embed_raw=args.quick, indent=2, default=str)
    if rows:
        png_path = args.out_dir / f"{stem}.png"
        plot(rows, png_path, title=plot_title(result), show_reference=not args.quick)
        log(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
