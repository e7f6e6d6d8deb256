"""Time to result: adaptive K-FAC (no tuning) against tuned first-order optimizers and tuned K-FAC (issue 14).

Workloads (``benchmarks/cpu/ttr/workloads.py``; offline, deterministic given the seed): ``autoencoder`` (deep MLP
autoencoder on digits, full-data Bernoulli loss), ``classification`` (MLP on digits, test accuracy), ``cnn`` (a CNN
with BatchNorm and GroupNorm on digits, full training-set loss; test accuracy and loss reported beside it) and ``lm``
(a character-level causal transformer on standard-library source text, held-out loss).

Optimizers (``benchmarks/cpu/ttr/optimizers.py``): SGD with momentum 0.9, AdamW, Muon (with AdamW on what is not a
matrix), SOAP, K-FAC around SGD momentum 0.9 at the library's defaults, each at its own learning rate chosen from a
grid on the tuning seed (100; best final metric, a diverged run worst), and adaptive K-FAC with no tuning at all.
Every optimizer gets the same model initialisation, data order and step budget per seed; the evaluation seeds
(0 .. --seeds - 1) differ from the tuning seed.

Reported per workload: the target (the best first-order peer's median final metric), and per optimizer the median
over seeds of the final metric, the steps to reach the target and the training wall time to reach it (evaluation
excluded), with ratios to the best peer and to the fastest peer (the peer reaching the target in the fewest steps),
and the runs that diverged; ``results/time_to_result.json`` and a PNG of the median curves. Runs use 2 torch threads
with denormals flushed to zero (``runner.setup``).

Budgets (steps, evaluation interval, default batch) and training time per step at the default batch on 2 cores, in
ms (SGD, AdamW, Muon, SOAP, K-FAC, adaptive K-FAC; the evaluation of the metric apart):

    autoencoder     300  10  256    0.9  1.1  2.9  2.0   3.5   8-10
    classification  200  10  512    1.8  1.9  3.5  4.3   6.0  16-19
    cnn             120   5  128    2.2  2.5  3.1  4.5  10.5  22-29   (evaluation 25 ms)
    lm              200  10   32    5.7  6.1  8.5  8.1  14.5  44-49   (evaluation 13 ms)

    python benchmarks/cpu/time_to_result.py                      # all four workloads, 3 seeds (~6 min on 2 cores)
    python benchmarks/cpu/time_to_result.py --workloads cnn lm   # a subset
    python benchmarks/cpu/time_to_result.py --batch-multiplier 4 # 4x each workload's batch (same lr grids)
    python benchmarks/cpu/time_to_result.py --quick              # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import machine_info, save_png, write_json  # noqa: E402
from benchmarks.cpu.ttr import optimizers, runner, workloads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(wl: workloads.Workload, kinds: list[str], seeds: list[int], quick: bool) -> dict[str, Any]:
    """Tune, run every seed and summarise one workload (see :func:`runner.summarize`)."""
    lrs: dict[str, float | None] = {}
    for k in kinds:
        grid = optimizers.grid(k, quick)
        lrs[k] = None if grid is None else runner.tune(k, grid, wl, runner.TUNING_SEED)[0]
    runs = {k: [runner.run(k, lrs[k], wl, s) for s in seeds] for k in kinds}
    return runner.summarize(wl, runs, lrs)


def fmt(value: float | None, spec: str) -> str:
    return format(math.nan if value is None else value, spec)


def print_table(name: str, w: dict[str, Any], seeds: int) -> None:
    print(f"\n{name} (batch {w['batch']}, {w['steps']} steps): target = best peer ({w['best_peer']}) median final "
          f"{w['target']:.4g} ({w['metric']}, {'higher' if w['higher_is_better'] else 'lower'} is better); fastest "
          f"peer to it: {w['fastest_peer']}; medians over {seeds} seeds")
    print(f"{'optimizer':10s} {'lr':>7s} {'final':>9s} {'steps':>7s} {'x best':>7s} {'x fast':>7s} {'seconds':>8s} "
          f"{'x best':>7s} {'x fast':>7s} {'diverged':>8s}  extras")
    for k, row in w["rows"].items():
        lr = "-" if row["lr"] is None else f"{row['lr']:g}"
        extras = " ".join(f"{e} {v:.4g}" for e, v in row["extras"].items())
        print(f"{k:10s} {lr:>7s} {row['final']:9.4g} {row['steps_to_target']:7.0f} {fmt(row['steps_ratio'], '7.2f')} "
              f"{fmt(row['steps_ratio_fastest_peer'], '7.2f')} {row['seconds_to_target']:8.2f} "
              f"{fmt(row['time_ratio'], '7.2f')} {fmt(row['time_ratio_fastest_peer'], '7.2f')} "
              f"{row['diverged_or_non_finite']:8d}  {extras}", flush=True)


def plot(record: dict[str, Any], path: Path) -> None:
    """Median metric curves per workload, the target dotted (log scale for losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        w = record["workloads"][name]
        for k, curve in w["median_curves"].items():
            ax.plot([i * w["eval_every"] for i in range(len(curve))], curve, label=k)
        ax.axhline(w["target"], color="grey", linestyle=":", label="target")
        ax.set_title(f"{name} (batch {w['batch']})")
        ax.set_xlabel("step")
        ax.set_ylabel(w["metric"])
        if w["higher_is_better"]:  # an accuracy: the interesting part is the last few percent
            ax.set_ylim(max(0.0, w["target"] - 0.08), 1.0)
        else:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="evaluation seeds 0 .. SEEDS-1 (default 3)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, two-point grids, one seed (smoke test)")
    ap.add_argument("--workloads", nargs="+", choices=list(workloads.WORKLOADS), default=list(workloads.WORKLOADS))
    ap.add_argument("--batch-multiplier", type=int, default=1,
                    help="each workload's batch times this (default 1; other values write time_to_result_x<M>.*)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    runner.setup()
    kinds = optimizers.kinds()
    seeds = list(range(1 if args.quick else args.seeds))
    record: dict[str, Any] = {
        "machine": machine_info(threads=torch.get_num_threads(), flush_denormal=True), "workloads": {},
        "seeds": seeds, "tuning_seed": runner.TUNING_SEED, "batch_multiplier": args.batch_multiplier, "quick": args.quick,
        "grids": {k: optimizers.grid(k, args.quick) for k in kinds}}
    for name in args.workloads:
        wl = workloads.build(name, batch_multiplier=args.batch_multiplier, quick=args.quick)
        print(f"{name}: batch {wl.batch}, {wl.steps} steps, evaluated every {wl.eval_every}", flush=True)
        record["workloads"][name] = evaluate(wl, kinds, seeds, args.quick)
        print_table(name, record["workloads"][name], len(seeds))
    stem = "time_to_result" + (f"_x{args.batch_multiplier}" if args.batch_multiplier != 1 else "") \
        + ("_quick" if args.quick else "")
    write_json(args.out_dir / f"{stem}.json", record, indent=1)
    print(f"wrote {args.out_dir / f'{stem}.json'}")
    plot(record, args.out_dir / f"{stem}.png")


if __name__ == "__main__":
    main()
