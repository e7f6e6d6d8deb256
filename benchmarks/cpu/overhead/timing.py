"""The step-overhead benchmark's timing: every configuration warmed up, then interleaved timed windows; the
per-configuration summary (ratios to SGD and, where measured, to KAISA) and its table."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import build_model, log, rotated
from benchmarks.cpu.overhead.configs import KAISA_METHODS, Config
from benchmarks.cpu.overhead.runners import KaisaRunner, Runner, make_runner, time_window


def run_benchmark(configs: list[Config], batches: list[tuple[Tensor, Tensor]], *, repeats: int, periods: int,
                  warmup: int, quick: bool, seed: int, kaisa: Path | None = None,
                  threads: int = 1) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Warm every configuration up, then time interleaved windows; return raw records per configuration key and
    where KAISA came from (empty without it)."""
    runners: list[Runner | KaisaRunner] = []
    origin: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            if c.method in KAISA_METHODS:
                assert kaisa is not None
                payload = Path(tmp) / "payload.pt"
                if not payload.exists():  # the same initial weights and batches as every other configuration
                    torch.save({"model": build_model(quick, seed), "batches": batches}, payload)
                k = KaisaRunner(c, kaisa, payload, threads)
                origin = {"package": k.origin, "version": k.version}
                runners.append(k)
            else:
                runners.append(make_runner(c, batches, quick=quick, seed=seed))
        try:
            return _time_all(runners, repeats=repeats, periods=periods, warmup=warmup), origin
        finally:
            for r in runners:
                if isinstance(r, KaisaRunner):
                    r.close()


def _time_all(runners: list[Runner | KaisaRunner], *, repeats: int, periods: int,
              warmup: int) -> dict[str, list[dict[str, Any]]]:
    t_start = time.perf_counter()
    for r in runners:
        t0 = time.perf_counter()
        if isinstance(r, KaisaRunner):
            r.run(warmup)
        else:
            for _ in range(warmup):
                r.step()
        log(f"warm-up {r.config.key:<20s} {warmup} steps in {time.perf_counter() - t0:7.1f} s")
    raw: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in range(repeats):
        for r in rotated(runners, rep):
            rec = time_window(r, periods * r.config.inv_update_steps)
            rec["repeat"] = rep
            raw[r.config.key].append(rec)
            if rec.get("skipped_steps"):
                log(f"WARNING: {r.config.key}: {rec['skipped_steps']} K-FAC steps skipped (non-finite) in window")
            log(f"repeat {rep + 1}/{repeats} {r.config.key:<20s} {rec['ms_per_step']:9.1f} ms/step "
                f"({rec['steps']} steps, {rec['seconds']:.1f} s; elapsed {time.perf_counter() - t_start:.0f} s)")
    return dict(raw)


def summarise(configs: list[Config], raw: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median/min ms per step and ratios vs the SGD configuration of the same schedule."""
    rows = []
    for c in configs:
        times = [rec["ms_per_step"] for rec in raw[c.key]]
        sgd_key = Config(c.factor_update_steps, c.inv_update_steps, "sgd").key
        sgd_by_rep = {rec["repeat"]: rec["ms_per_step"] for rec in raw[sgd_key]}
        sgd_median = statistics.median(sgd_by_rep.values())
        paired = [rec["ms_per_step"] / sgd_by_rep[rec["repeat"]] for rec in raw[c.key]]
        rows.append({
            "schedule": c.schedule, "factor_update_steps": c.factor_update_steps,
            "inv_update_steps": c.inv_update_steps, "method": c.method,
            "ms_per_step_median": statistics.median(times), "ms_per_step_min": min(times),
            "ms_per_step_max": max(times), "ratio_vs_sgd": statistics.median(times) / sgd_median,
            "ratio_vs_sgd_paired_median": statistics.median(paired), "ratio_vs_sgd_paired_min": min(paired),
            "ratio_vs_sgd_paired_max": max(paired), "repeats": len(times),
        })
    by_key = {(r["schedule"], r["method"]): r for r in rows}
    for row in rows:  # ours / KAISA, same schedule and method, where KAISA was measured
        peer = by_key.get((row["schedule"], f"kaisa-{row['method'].split('-')[0]}"))
        if peer is None:
            continue
        theirs = {rec["repeat"]: rec["ms_per_step"] for rec in raw[Config(row["factor_update_steps"],
                                                                           row["inv_update_steps"],
                                                                           peer["method"]).key]}
        ours = {rec["repeat"]: rec["ms_per_step"] for rec in raw[Config(row["factor_update_steps"],
                                                                         row["inv_update_steps"], row["method"]).key]}
        row["ratio_vs_kaisa"] = row["ms_per_step_median"] / peer["ms_per_step_median"]
        row["ratio_vs_kaisa_paired_median"] = statistics.median(ours[k] / theirs[k] for k in ours if k in theirs)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    kaisa = any("ratio_vs_kaisa" in r for r in rows)
    lines = [f"{'config (fus,ius)':<17s} {'method':<14s} {'ms/step median':>15s} {'min':>10s} {'ratio vs SGD':>13s}"
             + (f" {'ours / KAISA':>13s}" if kaisa else ""), "-" * (73 + (14 if kaisa else 0))]
    for row in rows:
        lines.append(f"{row['schedule']:<17s} {row['method']:<14s} {row['ms_per_step_median']:15.1f} "
                     f"{row['ms_per_step_min']:10.1f} {row['ratio_vs_sgd']:12.2f}x"
                     + (f" {row['ratio_vs_kaisa']:12.2f}x" if "ratio_vs_kaisa" in row else ""))
    return "\n".join(lines)


