"""Text of the distributed benchmark: the tables of part (a) and the at-scale summary of part (b)
(``planner_scale.json``, the planner's cost model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT
from benchmarks.cpu.strategies.configs import PLAN_CATEGORIES


def byte_unit(largest: float) -> tuple[str, float]:
    """("MiB", 2**20) for sizes of a MiB or more, else ("KiB", 1024): keeps the tiny --quick model readable."""
    return ("MiB", 2.0**20) if largest >= 2.0**20 else ("KiB", 1024.0)



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

