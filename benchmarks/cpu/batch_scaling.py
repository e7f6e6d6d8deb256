"""Batch-size scaling: steps to a fixed target against the batch size, per optimizer (the critical-batch-size
picture of Shallue et al., 2019, and McCandlish et al., 2018).

Workloads ``cnn`` and ``lm`` of ``benchmarks/cpu/ttr/workloads.py`` at their default batch times 1, 2, 4, 8 and 16,
each for the workload's step budget; the optimizers of ``benchmarks/cpu/ttr/optimizers.py`` with their lr grids.

Protocol, per workload:

1. Target. The first-order peers at the default batch, each tuned on the tuning seed (100) for the best final metric
   as in ``time_to_result.py``, then run on the evaluation seeds (0 .. --seeds - 1): the target is the best peer's
   median final metric, so it is reachable at the default batch and (more data per step) at every larger one.
2. Each batch. Every tunable optimizer's lr minimises the steps to the target on the tuning seed (the quantity
   measured; runs that never reach it rank by final metric), found by a local search on its grid
   (``runner.tune_steps``; steps to target taken as unimodal in lr): at the default batch from the peers' lr of step
   1 (K-FAC's from the middle of its grid), up while better, else down; at each larger batch from the lr chosen at
   the previous one, up only (the best lr does not fall as the batch grows: Goyal et al., 2017; Shallue et al.,
   2019). Adaptive K-FAC is not tuned. Then the evaluation seeds: the median of their steps to target (a run that
   never reaches it counting as infinitely late; of two seeds, the later) is the result.

Runs stop at the target, on divergence, and in the search once they can no longer beat the incumbent; runs already
made are reused (``runner.Cache``): that is what makes the study fit its time. A target set at a median of two seeds
is the worse seed's final (``runner.median_metric``), so the peer that set it reaches it on both.

Reported: per workload and batch, each optimizer's lr, steps (and training seconds) to target, and adaptive K-FAC's
steps over the best peer's (the peer with the fewest steps at that batch); ``results/batch_scaling.json`` (every
run's curve with ``--raw``; kept in the ``--quick`` output) and ``results/batch_scaling.png`` (steps to target vs
batch size, log-log, one line per optimizer, perfect scaling dotted).

    python benchmarks/cpu/batch_scaling.py            # cnn and lm, 2 seeds (~17 min on 2 cores: cnn ~4.5, lm ~12)
    python benchmarks/cpu/batch_scaling.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import add_raw_argument, machine_info, save_png, write_results  # noqa: E402
from benchmarks.cpu.ttr import optimizers, runner, workloads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("cnn", "lm")
MULTIPLIERS = (1, 2, 4, 8, 16)
QUICK_MULTIPLIERS = (1, 2)
RAW_KEYS = [("workloads", "*", "batches", "*", "rows", "*", "runs", "*", "curve")]


def target_of(base: workloads.Workload, peers: list[str], seeds: list[int], quick: bool,
              cache: runner.Cache) -> dict[str, Any]:
    """Step 1 of the protocol: the peers tuned for the final metric at the default batch and the target."""
    lrs = {k: runner.tune(k, optimizers.grid(k, quick) or [], base, runner.TUNING_SEED, run_fn=cache)[0]
           for k in peers}
    finals = {k: runner.median_metric([cache(k, lrs[k], base, s)["final"] for s in seeds], base.higher_is_better)
              for k in peers}
    peer = runner.best_peer(finals, base.higher_is_better)
    return {"target": finals[peer], "peer": peer, "lrs": lrs, "finals": finals}


def row(kind: str, wl: workloads.Workload, target: float, start: float | None, downward: bool, seeds: list[int],
        quick: bool, cache: runner.Cache) -> dict[str, Any]:
    """Step 2 for one optimizer at one batch: its lr (searched from ``start``, None: the grid's middle), tuning runs
    and evaluation runs."""
    grid = optimizers.grid(kind, quick)
    lr: float | None = None
    tuning: dict[float, runner.Run] = {}
    if grid is not None:
        middle = sorted(grid)[len(grid) // 2]
        lr, tuning = runner.tune_steps(kind, grid, wl, runner.TUNING_SEED, target,
                                       middle if start is None else start, downward=downward, run_fn=cache)
    tuned = None if lr is None else not math.isnan(runner.reached(tuning[lr], target, wl)[0])
    runs = [cache(kind, lr, wl, s, target=target) for s in seeds]
    hits = [runner.reached(r, target, wl) for r in runs]
    return {"lr": lr, "reached_on_tuning_seed": tuned,
            "tuning": {f"{x:g}": {"steps_to_target": runner.reached(r, target, wl)[0], "steps_run": r["steps_run"],
                                  "final": r["final"]} for x, r in sorted(tuning.items())},
            "steps_to_target": runner.median(h[0] for h in hits),
            "seconds_to_target": runner.median(h[1] for h in hits),
            "runs": [{"seed": s, "steps_to_target": h[0], "seconds_to_target": h[1], "steps_run": r["steps_run"],
                      "diverged": r["diverged"], "curve": r["curve"]} for s, h, r in zip(seeds, hits, runs)]}


def study(name: str, kinds: list[str], seeds: list[int], multipliers: tuple[int, ...], quick: bool) -> dict[str, Any]:
    """The protocol of the module docstring for one workload."""
    cache = runner.Cache()
    base = workloads.build(name, quick=quick)
    print(f"{name}: target from the peers at the default batch {base.batch}, {base.steps} steps", flush=True)
    target = target_of(base, [k for k in kinds if k in optimizers.PEERS], seeds, quick, cache)
    print(f"{name}: target {target['target']:.4g} (best peer {target['peer']})", flush=True)
    start: dict[str, float | None] = {k: target["lrs"].get(k) for k in kinds}
    batches: dict[str, Any] = {}
    for m in multipliers:
        wl = workloads.build(name, batch_multiplier=m, quick=quick)
        rows = {}
        for k in kinds:
            rows[k] = row(k, wl, target["target"], start[k], m == multipliers[0], seeds, quick, cache)
            start[k] = rows[k]["lr"]
            print(f"  {name} b{wl.batch} {k}: steps to target {rows[k]['steps_to_target']:.0f}", flush=True)
        peers = [k for k in optimizers.PEERS if k in rows and not math.isnan(rows[k]["steps_to_target"])]
        best = min(peers, key=lambda k: rows[k]["steps_to_target"]) if peers else None
        adaptive = rows["adaptive"]["steps_to_target"] if "adaptive" in rows else math.nan
        batches[str(wl.batch)] = {
            "multiplier": m, "batch": wl.batch, "rows": rows, "best_peer": best,
            "adaptive_over_best_peer": runner.ratio(adaptive, rows[best]["steps_to_target"]) if best else None}
    return {**base.info(), "target": target["target"], "target_peer": target["peer"],
            "target_peer_lrs": target["lrs"], "target_peer_finals": target["finals"], "batches": batches}


def print_table(name: str, w: dict[str, Any]) -> None:
    batches = list(w["batches"].values())
    print(f"\n{name}: steps to target {w['target']:.4g} ({w['metric']}; the best peer's median final at the default "
          f"batch, {w['target_peer']}), medians over the seeds; lr in brackets")
    print(f"{'optimizer':10s}" + "".join(f"{'batch ' + str(b['batch']):>17s}" for b in batches))
    for k in batches[0]["rows"]:
        cells = []
        for b in batches:
            r = b["rows"][k]
            lr = "-" if r["lr"] is None else f"{r['lr']:g}"
            cells.append(f"{r['steps_to_target']:.0f} ({lr})")
        print(f"{k:10s}" + "".join(f"{c:>17s}" for c in cells))
    print(f"{'best peer':10s}" + "".join(f"{str(b['best_peer']):>17s}" for b in batches))
    print(f"{'adapt/best':10s}" + "".join(
        f"{math.nan if b['adaptive_over_best_peer'] is None else b['adaptive_over_best_peer']:17.2f}"
        for b in batches), flush=True)


def plot(record: dict[str, Any], path: Path) -> None:
    """Steps to target vs batch size per workload, log-log, one line per optimizer; perfect scaling (steps halve
    when the batch doubles) dotted from the fewest steps at the default batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        w = record["workloads"][name]
        batches = [b["batch"] for b in w["batches"].values()]
        kinds = list(next(iter(w["batches"].values()))["rows"])
        for k in kinds:
            steps = [b["rows"][k]["steps_to_target"] for b in w["batches"].values()]
            ax.plot(batches, steps, marker="o", label=k)
        first = [s for s in (r["steps_to_target"] for r in next(iter(w["batches"].values()))["rows"].values())
                 if not math.isnan(s)]
        if first:
            ax.plot(batches, [min(first) * batches[0] / b for b in batches], color="grey", linestyle=":",
                    label="perfect scaling")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_title(f"{name}: steps to {w['metric']} {w['target']:.3g}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("steps to target (median)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="evaluation seeds 0 .. SEEDS-1 (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny budgets, two-point grids, batch multipliers {QUICK_MULTIPLIERS} (smoke test)")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    add_raw_argument(ap, "batch_scaling")
    args = ap.parse_args()
    runner.setup()
    kinds = optimizers.kinds()
    seeds = list(range(args.seeds))
    multipliers = QUICK_MULTIPLIERS if args.quick else MULTIPLIERS
    record: dict[str, Any] = {
        "machine": machine_info(threads=torch.get_num_threads(), flush_denormal=True), "workloads": {},
        "seeds": seeds, "tuning_seed": runner.TUNING_SEED, "multipliers": list(multipliers), "quick": args.quick,
        "optimizers": kinds, "grids": {k: optimizers.grid(k, args.quick) for k in kinds}}
    for name in args.workloads:
        record["workloads"][name] = study(name, kinds, seeds, multipliers, args.quick)
        print_table(name, record["workloads"][name])
    stem = "batch_scaling_quick" if args.quick else "batch_scaling"
    write_results(args.out_dir / f"{stem}.json", record, RAW_KEYS, raw=args.raw, embed_raw=args.quick, indent=1)
    plot(record, args.out_dir / f"{stem}.png")


if __name__ == "__main__":
    main()
