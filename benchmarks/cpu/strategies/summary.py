"""Per-configuration statistics of the distributed benchmark from every rank's report: step times, bytes per
step measured and predicted by the plan, memory."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.cpu.strategies.configs import CONFIGS, PLAN_CATEGORIES


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

