"""One training run, learning-rate tuning, steps to a target and the per-workload summary.

Conventions. A run of optimizer ``kind`` on workload ``wl`` with ``seed`` builds ``wl.model(seed)`` and draws its
batches from a generator seeded with ``seed``, so every optimizer sees the same initialisation and batch order. Its
``curve`` holds the metric before training and after every ``wl.eval_every`` steps, ``times`` the training wall time
(zero_grad, forward, backward, step; sampling and evaluation excluded) at those points. A run stops early when its
training loss or metric becomes non-finite (diverged: the rest of its curve is nan, the worst value) or, given a
``target``, at the first evaluation that reaches it (its curve then ends there). Medians over seeds count a nan
metric as the worst value (of an even count, the worse of the two middle values) and a run that never reached the
target as infinitely late; a median that lands on such a run is nan.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .optimizers import PEERS, make
from .workloads import Workload

TUNING_SEED = 100
"""The seed learning rates are chosen on (the evaluation seeds are 0, 1, ...)."""


def setup() -> None:
    """The settings every run of these benchmarks uses: 2 torch threads, denormals flushed to zero (subnormal floats
    otherwise slowed SOAP and K-FAC steps down up to 250x on this CPU)."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)


Run = dict[str, Any]
"""``curve``, ``times``, ``extras`` (name -> value at the last evaluation), ``final`` (the last metric),
``steps_run``, ``finite`` (all parameters finite at the end), ``diverged``."""


def hit(value: float, target: float, higher: bool) -> bool:
    """Whether ``value`` is at or past ``target``."""
    return not math.isnan(value) and (value >= target if higher else value <= target)


def better(a: float, b: float, higher: bool) -> bool:
    """Whether metric ``a`` is strictly better than ``b`` (nan is never better)."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a > b if higher else a < b)


def run(kind: str, lr: float | None, wl: Workload, seed: int, *, target: float | None = None,
        max_steps: int | None = None, label: str = "") -> Run:
    """Train a fresh model with ``kind`` at ``lr`` for ``wl.steps`` steps, or ``max_steps`` if fewer (see the module
    docstring)."""
    wall = time.perf_counter()
    model = wl.model(seed)
    opt = make(kind, model, lr, wl)
    opts = opt if isinstance(opt, list) else [opt]
    g = torch.Generator().manual_seed(seed)
    first = wl.measure(model)
    curve, times, elapsed = [first.pop("metric")], [0.0], 0.0
    extras, diverged, step = first, False, 0
    for step in range(1, (wl.steps if max_steps is None else min(wl.steps, max_steps)) + 1):
        batch = wl.sample(g, wl.batch)
        start = time.perf_counter()
        if kind == "adaptive":
            opt.step(lambda: wl.loss(model, batch))
        else:
            for o in opts:
                o.zero_grad()
            loss = wl.loss(model, batch)
            if not math.isfinite(loss.item()):
                diverged = True
            else:
                loss.backward()
                for o in opts:
                    o.step()
        elapsed += time.perf_counter() - start
        if diverged:
            break
        if step % wl.eval_every == 0:
            measured = wl.measure(model)
            value = measured.pop("metric")
            diverged = not math.isfinite(value)
            curve.append(float("nan") if diverged else value)
            times.append(elapsed)
            extras = measured
            if diverged or (target is not None and hit(value, target, wl.higher_is_better)):
                break
    if diverged:  # the worst value for the rest of the budget
        extras = {k: float("nan") for k in extras}
        missing = wl.steps // wl.eval_every + 1 - len(curve)
        curve += [float("nan")] * missing
        times += [elapsed] * missing
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    out = {"curve": curve, "times": times, "extras": extras, "final": curve[-1], "steps_run": step,
           "finite": finite, "diverged": diverged}
    lr_text = "-" if lr is None else f"{lr:g}"
    print(f"    {label}{wl.name} b{wl.batch} {kind:8s} lr {lr_text:>6s} seed {seed:3d}: metric {curve[-1]:.4g} after "
          f"{step} steps ({elapsed:.1f} s training, {time.perf_counter() - wall:.1f} s wall)"
          f"{' DIVERGED' if diverged else ''}", flush=True)
    return out


def reached(run_: Run, target: float, wl: Workload) -> tuple[float, float]:
    """(steps, seconds) to the first evaluation at or past ``target`` (nan if never)."""
    for i, value in enumerate(run_["curve"]):
        if hit(value, target, wl.higher_is_better):
            return float(i * wl.eval_every), float(run_["times"][i])
    return float("nan"), float("nan")


def median(values: Iterable[float]) -> float:
    """Median of steps or seconds to a target, nan (never reached) counting as infinitely late."""
    value = statistics.median(math.inf if math.isnan(v) else v for v in values)
    return float("nan") if math.isinf(value) else float(value)


def median_metric(values: Iterable[float], higher: bool) -> float:
    """Median of a metric over seeds, nan (diverged) counting as the worst value; of an even count, the worse of the
    two middle values (a run's own value, so the median steps of a target set at a median final is finite)."""
    worst = -math.inf if higher else math.inf
    ordered = sorted((worst if math.isnan(v) else v for v in values), reverse=higher)  # best first
    value = ordered[len(ordered) // 2]
    return float("nan") if math.isinf(value) else float(value)


def score(run_: Run, wl: Workload, target: float | None) -> tuple[int, float]:
    """Sort key of a tuning run, smaller is better: with a ``target``, reaching it in fewer steps first; then the
    better final metric; a diverged run last."""
    if target is not None:
        steps = reached(run_, target, wl)[0]
        if not math.isnan(steps):
            return 0, steps
    final = run_["final"]
    if math.isnan(final):
        return 2, 0.0
    return 1, -final if wl.higher_is_better else final


RunFn = Callable[..., Run]
""":func:`run` or a :class:`Cache` of it."""


def tune(kind: str, grid: Sequence[float], wl: Workload, seed: int, *,
         run_fn: RunFn = run) -> tuple[float, dict[float, Run]]:
    """The lr of ``grid`` whose full-budget run on ``seed`` ends with the best metric (ties: the first in the grid),
    and the runs."""
    runs = {lr: run_fn(kind, lr, wl, seed, label="tune ") for lr in grid}
    best = min(grid, key=lambda lr: score(runs[lr], wl, None))
    report(kind, grid, best, runs, wl, None)
    return float(best), runs


def tune_steps(kind: str, grid: Sequence[float], wl: Workload, seed: int, target: float, start: float, *,
               downward: bool = True, run_fn: RunFn = run) -> tuple[float, dict[float, Run]]:
    """The lr of ``grid`` reaching ``target`` in the fewest steps on ``seed`` (else with the best final metric), by a
    local search from ``start`` (the grid point nearest it): up the grid while each step up is better, then, if none
    was and ``downward``, down likewise (ties keep the incumbent; the score is taken as unimodal in lr). Each run
    stops at the target, and once it can no longer beat the incumbent (one evaluation before the incumbent's steps to
    target). Returns the lr and the runs tried."""
    grid = sorted(grid)
    runs: dict[float, Run] = {}

    def beats(i: int, best: float) -> bool:  # runs grid[i]; whether it beats the incumbent ``best``
        incumbent = score(runs[best], wl, target)
        cap = None if incumbent[0] else int(incumbent[1]) - wl.eval_every
        if cap is not None and cap < wl.eval_every:
            return False
        runs[grid[i]] = run_fn(kind, grid[i], wl, seed, target=target, max_steps=cap, label="tune ")
        return score(runs[grid[i]], wl, target) < incumbent

    i0 = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / start)))
    runs[grid[i0]] = run_fn(kind, grid[i0], wl, seed, target=target, label="tune ")
    best = grid[i0]
    for direction in (1, -1) if downward else (1,):
        i = i0 + direction
        while 0 <= i < len(grid) and beats(i, best):
            best, i = grid[i], i + direction
        if best != grid[i0]:
            break
    report(kind, grid, best, runs, wl, target)
    return float(best), runs


def report(kind: str, grid: Sequence[float], best: float, runs: dict[float, Run], wl: Workload,
           target: float | None) -> None:
    """Print the tuning result: the chosen lr (flagged at the edge of the grid) and each run's final metric (and, with a
    ``target``, its steps run)."""
    edge = " (edge of the grid)" if len(grid) > 1 and best in (min(grid), max(grid)) else ""
    print(f"  {wl.name} b{wl.batch} {kind:8s} tuned lr {best:g}{edge}  (grid: "
          + ", ".join(f"{lr:g}: {r['final']:.4g}" + ("" if target is None else f"@{r['steps_run']}")
                      for lr, r in sorted(runs.items())) + ")", flush=True)


class Cache:
    """:func:`run`, remembering runs by (kind, lr, batch, seed): a remembered run answers a later call when it ran the
    full budget, diverged, reached the later call's target or ran at least its ``max_steps``."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, float | None, int, int], Run] = {}

    def __call__(self, kind: str, lr: float | None, wl: Workload, seed: int, *, target: float | None = None,
                 max_steps: int | None = None, label: str = "") -> Run:
        key = (kind, lr, wl.batch, seed)
        old = self.runs.get(key)
        if old is not None and (old["steps_run"] >= min(wl.steps, max_steps or wl.steps) or old["diverged"]
                                or (target is not None and not math.isnan(reached(old, target, wl)[0]))):
            return old
        self.runs[key] = run(kind, lr, wl, seed, target=target, max_steps=max_steps, label=label)
        return self.runs[key]


def best_peer(finals: dict[str, float], higher: bool) -> str:
    """The first-order peer (``PEERS``) with the best median final metric (the first in ``PEERS`` on ties)."""
    peers = [k for k in PEERS if k in finals]
    best = peers[0]
    for k in peers:
        if better(finals[k], finals[best], higher):
            best = k
    return best


def ratio(a: float, b: float) -> float | None:
    """``a / b``; None when ``b`` is zero (nan propagates)."""
    return a / b if b else None


def summarize(wl: Workload, runs: dict[str, list[Run]], lrs: dict[str, float | None]) -> dict[str, Any]:
    """Target (the best peer's median final), best and fastest peer, and per optimizer: lr, median final metric and
    extras, median steps and seconds to the target, ratios to the best and to the fastest peer, divergences."""
    higher = wl.higher_is_better
    finals = {k: median_metric([r["final"] for r in rs], higher) for k, rs in runs.items()}
    peer = best_peer(finals, higher)
    target = finals[peer]
    rows: dict[str, dict[str, Any]] = {}
    for k, rs in runs.items():
        hits = [reached(r, target, wl) for r in rs]
        rows[k] = {"lr": lrs[k], "final": finals[k],
                   "extras": {e: median_metric([r["extras"][e] for r in rs], up)
                              for e, up in wl.extras_higher_is_better.items()},
                   "steps_to_target": median(h[0] for h in hits), "seconds_to_target": median(h[1] for h in hits),
                   "seconds_total": statistics.median(r["times"][-1] for r in rs),
                   "diverged_or_non_finite": sum(not r["finite"] or math.isnan(r["final"]) for r in rs)}
    peers = [k for k in PEERS if k in rows]
    # the first-order peer that reaches the target soonest (it may not be the one with the best final metric)
    fastest = min(peers, key=lambda k: math.inf if math.isnan(rows[k]["steps_to_target"])
                  else rows[k]["steps_to_target"])
    for row in rows.values():
        row["steps_ratio"] = ratio(row["steps_to_target"], rows[peer]["steps_to_target"])
        row["time_ratio"] = ratio(row["seconds_to_target"], rows[peer]["seconds_to_target"])
        row["steps_ratio_fastest_peer"] = ratio(row["steps_to_target"], rows[fastest]["steps_to_target"])
        row["time_ratio_fastest_peer"] = ratio(row["seconds_to_target"], rows[fastest]["seconds_to_target"])
    curves = {k: [median_metric([r["curve"][i] for r in rs], higher) for i in range(len(rs[0]["curve"]))]
              for k, rs in runs.items()}
    return {**wl.info(), "target": target, "best_peer": peer, "fastest_peer": fastest, "rows": rows,
            "median_curves": curves}
