"""The GPU step-time benchmark's timing: interleaved windows of whole schedule periods, the per-configuration
summary (ratios to SGD, step kinds, peak memory) and its table."""

from __future__ import annotations

import gc
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from benchmarks.common import log, rotated
from benchmarks.gpu.step.configs import GOAL
from benchmarks.gpu.step.runners import Runner, StepClock, sync


def time_window(r: Runner, steps: int, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    first = r.step_index()
    skipped_before = getattr(r.preconditioner, "skipped_steps", 0)
    kinds = []
    clock = StepClock(device)
    gc.collect()
    sync(device)
    if cuda:
        start_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    gc.disable()
    try:
        with r.context():
            t0 = time.perf_counter()
            clock.mark()
            for _ in range(steps):
                kinds.append(r.kind_of_step(r.step_index()))
                r.step()
                clock.mark()
            sync(device)
            wall = time.perf_counter() - t0
    finally:
        gc.enable()
    per_step = clock.elapsed_ms()
    total_ms = sum(per_step)
    rec: dict[str, Any] = {
        "steps": steps, "first_step": first, "ms_total": total_ms, "ms_per_step": total_ms / steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "skipped_steps": getattr(r.preconditioner, "skipped_steps", 0) - skipped_before,
        "step_ms": {k: [t for t, kk in zip(per_step, kinds) if kk == k] for k in ("plain", "factor_update", "refresh")},
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - start_alloc
        rec["peak_bytes_above_start"] = peak
        r.peaks_above_start.append(peak)
    return rec


def run_benchmark(runners: list[Runner], *, device: torch.device, repeats: int, periods: int, period_steps: int,
                  failed: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Interleaved timed windows of ``periods * period_steps`` steps (every config, SGD included)."""
    t_start = time.perf_counter()
    raw: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in range(repeats):
        for r in rotated(runners, rep):
            steps = periods * period_steps
            if r.name in failed:
                continue
            try:
                rec = time_window(r, steps, device)
            except Exception as exc:  # noqa: BLE001 - record and go on with the other configurations
                failed[r.name] = f"timed window: {type(exc).__name__}: {exc}"
                log(f"FAILED {r.name}: {failed[r.name]}")
                continue
            rec["repeat"] = rep
            raw[r.name].append(rec)
            if rec["skipped_steps"]:
                log(f"WARNING: {r.name}: {rec['skipped_steps']} steps skipped (non-finite gradients) in the window")
            log(f"repeat {rep + 1}/{repeats} {r.name:<20s} {rec['ms_per_step']:9.2f} ms/step ({steps} steps; "
                f"elapsed {time.perf_counter() - t_start:.0f} s)")
    return dict(raw)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(runners: list[Runner], raw: dict[str, list[dict[str, Any]]], *, cuda: bool) -> list[dict[str, Any]]:
    sgd_by_rep = {rec["repeat"]: rec["ms_per_step"] for rec in raw.get("sgd", [])}
    sgd_median = statistics.median(sgd_by_rep.values()) if sgd_by_rep else None
    rows = []
    for r in runners:
        recs = raw[r.name]
        times = [rec["ms_per_step"] for rec in recs]
        med = statistics.median(times)
        paired = [rec["ms_per_step"] / sgd_by_rep[rec["repeat"]] for rec in recs if rec["repeat"] in sgd_by_rep]
        step_ms = {k: [t for rec in recs for t in rec["step_ms"][k]] for k in ("plain", "factor_update", "refresh")}
        ratio = med / sgd_median if sgd_median else None
        row: dict[str, Any] = {
            "config": r.name, "kind": r.kind, "ext_backend": r.backend,
            "schedule": list(r.schedule) if r.schedule else None,
            "ms_per_step_median": med, "ms_per_step_min": min(times), "ms_per_step_max": max(times),
            "wall_ms_per_step_median": statistics.median(rec["wall_ms_per_step"] for rec in recs),
            "ratio_vs_sgd": ratio,
            "ratio_vs_sgd_paired_median": _median(paired), "ratio_vs_sgd_paired_min": min(paired) if paired else None,
            "ratio_vs_sgd_paired_max": max(paired) if paired else None,
            "goal_met": (ratio <= GOAL) if (ratio is not None and r.kind != "sgd") else None,
            "plain_step_ms_median": _median(step_ms["plain"]),
            "factor_update_step_ms_median": _median(step_ms["factor_update"]),
            "refresh_step_ms_median": _median(step_ms["refresh"]),
            "refresh_steps_timed": len(step_ms["refresh"]),
            "repeats": len(times), "skipped_steps": sum(rec["skipped_steps"] for rec in recs),
        }
        if cuda:
            row["state_bytes"] = r.state_bytes
            row["peak_bytes"] = r.state_bytes + max(r.peaks_above_start)
        rows.append(row)
    return rows


def _fmt(v: float | None, spec: str = "8.1f") -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':<20s} {'ms/step':>8s} {'vs SGD':>7s} {'<=1.25x':>7s} {'plain':>8s} {'fac.upd':>8s} "
            f"{'refresh':>9s} {'peak GiB':>8s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        ratio = f"{row['ratio_vs_sgd']:6.2f}x" if row["ratio_vs_sgd"] is not None else f"{'-':>7s}"
        goal = {True: "yes", False: "NO", None: "-"}[row["goal_met"]]
        peak = row["peak_bytes"] / 2**30 if "peak_bytes" in row else None
        lines.append(f"{row['config']:<20s} {row['ms_per_step_median']:8.2f} {ratio} {goal:>7s} "
                     f"{_fmt(row['plain_step_ms_median'], '8.2f')} {_fmt(row['factor_update_step_ms_median'], '8.2f')} "
                     f"{_fmt(row['refresh_step_ms_median'], '9.1f')} {_fmt(peak, '8.2f')}")
    lines.append("(ms/step: amortised over whole schedule periods incl. the refresh, median over repeats; plain / "
                 "fac.upd / refresh: median ms of single steps without factor update or refresh / with a factor "
                 "update / with the refresh)")
    return "\n".join(lines)


