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
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing: `kfac` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import kfac  # noqa: E402
from benchmarks.common import (IMAGE, add_raw_argument, build_model, count_events, machine_info,  # noqa: E402
                               make_batches, save_png, write_results)

SCHEDULES: tuple[tuple[int, int], ...] = ((1, 10), (10, 100))
QUICK_SCHEDULES: tuple[tuple[int, int], ...] = ((1, 2), (2, 4))
METHODS: tuple[str, ...] = ("sgd", "eigen", "inverse")
KAISA_METHODS: tuple[str, ...] = ("kaisa-eigen", "kaisa-inverse")
BATCH = 32
SGD_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
KFAC_KWARGS: dict[str, float] = {"damping": 1e-3, "factor_decay": 0.95, "kl_clip": 1e-3}
# KAISA / kfac-pytorch, eigen method, ResNet-18, same 2-core machine class (context shown when --kaisa is not given).
KAISA_REFERENCE: dict[tuple[int, int], float] = {(10, 100): 9.2, (1, 10): 23.0}
RESULTS = Path(__file__).resolve().parent / "results"
RAW_KEYS: tuple[tuple[str, ...], ...] = (("raw",),)
"""Left out of the summary JSON (``--raw`` keeps them): every timed window, per configuration."""


# ----------------------------------------------------------------------------------------------------------
# models, data, one training configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """One timed configuration: a schedule and an optimizer method."""

    factor_update_steps: int
    inv_update_steps: int
    method: str

    @property
    def schedule(self) -> str:
        return f"({self.factor_update_steps},{self.inv_update_steps})"

    @property
    def key(self) -> str:
        return f"{self.schedule} {self.method}"


@dataclass
class Runner:
    """A model, its optimizer and a cursor into the shared batch pool."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[Tensor, Tensor]]
    cursor: int = 0
    steps: int = 0

    def step(self) -> None:
        x, y = self.batches[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()
        self.steps += 1

    @property
    def preconditioner(self) -> kfac.KFACPreconditioner | None:
        return self.optimizer.preconditioner if isinstance(self.optimizer, kfac.KFAC) else None


class KaisaRunner:
    """KAISA's preconditioner for one configuration, in its own worker process (see ``kaisa_worker.py``)."""

    def __init__(self, config: Config, kaisa: Path, payload: Path, threads: int) -> None:
        self.config = config
        spec = {"threads": threads, "payload": str(payload), "sgd": SGD_KWARGS, "kfac": KFAC_KWARGS,
                "factor_update_steps": config.factor_update_steps, "inv_update_steps": config.inv_update_steps,
                "method": config.method.removeprefix("kaisa-")}
        env = {**os.environ, "PYTHONPATH": str(kaisa)}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("kaisa_worker.py")),
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(kaisa))
        hello = self._read()
        if "error" in hello:
            raise RuntimeError(f"KAISA worker for {config.key} failed to start:\n{hello['error']}")
        origin = Path(hello["kaisa"]).resolve()
        if REPO_ROOT in origin.parents:
            raise RuntimeError(f"--kaisa {kaisa}: the worker imported this repository's kfac ({origin})")
        self.origin, self.version = str(origin.parent), hello.get("version")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"KAISA worker for {self.config.key} exited (code {self.proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, steps: int) -> dict[str, Any]:
        """Run ``steps`` steps in the worker (garbage collector paused there); its ``seconds`` and ``first_step``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "steps", "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()


TRUNCATE: dict[str, float] = {}
"""``{"truncate": ε}`` for the ``eigen-truncated`` configurations (added beside ``eigen`` by ``--truncate``)."""


def make_runner(config: Config, batches: list[tuple[Tensor, Tensor]], *, quick: bool, seed: int) -> Runner:
    model = build_model(quick, seed).train()
    base = torch.optim.SGD(model.parameters(), **SGD_KWARGS)
    if config.method == "sgd":
        opt: torch.optim.Optimizer = base
    else:
        extra = TRUNCATE if config.method == "eigen-truncated" else {}
        opt = kfac.KFAC(model, base, factor_update_steps=config.factor_update_steps,
                        inv_update_steps=config.inv_update_steps, method=config.method.split("-")[0],
                        **KFAC_KWARGS, **extra)
    return Runner(config=config, model=model, optimizer=opt, batches=batches)


def time_window(runner: Runner | KaisaRunner, steps: int) -> dict[str, Any]:
    """Run ``steps`` training steps with the garbage collector paused; return the wall time and schedule facts."""
    if isinstance(runner, KaisaRunner):
        out = runner.run(steps)
        cfg = runner.config
        return {"seconds": out["seconds"], "steps": steps, "ms_per_step": 1e3 * out["seconds"] / steps,
                "first_step": out["first_step"], "load_average_1min_after": os.getloadavg()[0],
                "refreshes": count_events(out["first_step"], steps, cfg.inv_update_steps),
                "factor_updates": count_events(out["first_step"], steps, cfg.factor_update_steps)}
    pre = runner.preconditioner
    start = pre.steps if pre is not None else runner.steps
    skipped_before = pre.skipped_steps if pre is not None else 0
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    record: dict[str, Any] = {"seconds": seconds, "steps": steps, "ms_per_step": 1e3 * seconds / steps,
                              "first_step": start, "load_average_1min_after": os.getloadavg()[0]}
    if pre is not None:
        cfg = runner.config
        record["refreshes"] = count_events(start, steps, cfg.inv_update_steps)
        record["factor_updates"] = count_events(start, steps, cfg.factor_update_steps)
        record["skipped_steps"] = pre.skipped_steps - skipped_before
    return record


# ----------------------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------------------
def make_configs(schedules: tuple[tuple[int, int], ...], *, kaisa: bool = False) -> list[Config]:
    configs = []
    for fus, ius in schedules:
        if ius % fus:
            raise ValueError(f"inv_update_steps={ius} must be a multiple of factor_update_steps={fus}")
        configs += [Config(fus, ius, m) for m in METHODS + (("eigen-truncated",) if TRUNCATE else ())
                    + (KAISA_METHODS if kaisa else ())]
    return configs


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
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for r in order:
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


# ----------------------------------------------------------------------------------------------------------
# profile (manual breakdown by wrapping methods of one optimizer instance)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PhaseTimer:
    """Accumulated seconds and call counts per phase, plus per-layer times for selected phases."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    layer_seconds: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    layer_calls: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def add(self, phase: str, seconds: float, layer: str | None = None) -> None:
        self.seconds[phase] += seconds
        self.calls[phase] += 1
        if layer is not None:
            self.layer_seconds[phase][layer] += seconds
            self.layer_calls[phase][layer] += 1

    def slowest_layers(self, phase: str, n: int = 8) -> dict[str, float]:
        """The ``n`` layers with the largest mean ms per call in ``phase``."""
        per_call = {k: 1e3 * v / self.layer_calls[phase][k] for k, v in self.layer_seconds[phase].items()}
        return dict(sorted(per_call.items(), key=lambda kv: -kv[1])[:n])

    def wrap(self, phase: str, fn: Callable[..., Any], layer_of: Callable[..., str | None] | None = None
             ) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t0, layer_of(*args, **kwargs) if layer_of else None)
        return wrapped


def instrument(opt: kfac.KFAC, timer: PhaseTimer) -> None:
    """Wrap (on this instance only) the phases of a K-FAC step with timers."""
    pre = opt.preconditioner
    pre._update_factors = timer.wrap("factor_update", pre._update_factors)
    pre._refresh = timer.wrap("refresh", pre._refresh)
    if hasattr(pre, "_preconditioned"):  # newer kfac: the preconditioned gradients, staged before they are written
        pre._preconditioned = timer.wrap("precondition", pre._preconditioned)
    else:
        pre._precondition = timer.wrap("precondition", pre._precondition)
    entry_name: Callable[..., str] = lambda entry, *a, **k: entry.name  # noqa: E731
    if hasattr(pre.method, "refresh_factor"):  # newer kfac: one call per (layer, factor)
        factor_name: Callable[..., str] = lambda entry, factor, *a, **k: f"{entry.name}:{factor}"  # noqa: E731
        pre.method.refresh_factor = timer.wrap("refresh_layer", pre.method.refresh_factor, factor_name)
    else:
        pre.method.refresh = timer.wrap("refresh_layer", pre.method.refresh, entry_name)
    pre.method.precondition = timer.wrap("precondition_layer", pre.method.precondition, entry_name)
    for name, adapter in pre.adapters.items():
        adapter.a_stat = timer.wrap("stats_a", adapter.a_stat, lambda *a, _n=name, **k: _n)  # type: ignore[method-assign]
        adapter.g_stat = timer.wrap("stats_g", adapter.g_stat, lambda *a, _n=name, **k: _n)  # type: ignore[method-assign]
    opt.optimizer.step = timer.wrap("base_step", opt.optimizer.step)


def run_profile(batches: list[tuple[Tensor, Tensor]], *, steps: int, quick: bool, seed: int,
                schedule: tuple[int, int]) -> dict[str, Any]:
    """Phase breakdown of ``steps`` eigen K-FAC steps (after one warm-up step) plus one explicit refresh."""
    fus, ius = schedule
    kfac_runner = make_runner(Config(fus, ius, "eigen-truncated" if TRUNCATE else "eigen"), batches, quick=quick,
                              seed=seed)
    sgd_runner = make_runner(Config(fus, ius, "sgd"), batches, quick=quick, seed=seed)
    for r in (kfac_runner, sgd_runner):
        r.step()  # warm-up (K-FAC: initial factor update + refresh)
    opt = kfac_runner.optimizer
    assert isinstance(opt, kfac.KFAC)
    pre = opt.preconditioner
    timer = PhaseTimer()
    instrument(opt, timer)
    first = pre.steps
    sgd_fwdbwd = sgd_step = 0.0
    gc.collect()
    gc.disable()
    try:
        for _ in range(steps):
            for r, is_kfac in ((kfac_runner, True), (sgd_runner, False)):
                x, y = r.batches[r.cursor]
                r.cursor = (r.cursor + 1) % len(r.batches)
                t0 = time.perf_counter()
                r.optimizer.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                F.cross_entropy(r.model(x), y).backward()
                t2 = time.perf_counter()
                r.optimizer.step()
                t3 = time.perf_counter()
                if is_kfac:
                    timer.add("zero_grad", t1 - t0)
                    timer.add("fwd_bwd", t2 - t1)
                    timer.add("kfac_step", t3 - t2)
                else:
                    sgd_fwdbwd += t2 - t1
                    sgd_step += t3 - t0
        # One more refresh through the scheduled code path (wrapped), on factors that have absorbed the
        # profiled updates, so the refresh sample is not the warm-up's first call.
        pre.refresh()  # the scheduled damping; runs the wrapped _refresh
    finally:
        gc.enable()

    s, c = timer.seconds, timer.calls
    captures = count_events(first, steps, fus)
    stats_total = s["stats_a"] + s["stats_g"]
    # The explicit refresh above ran outside kfac_step: subtract only the refreshes that ran inside steps.
    refresh_in_steps = count_events(first, steps, ius)
    refresh_per_call = s["refresh"] / max(c["refresh"], 1)
    other_kfac = s["kfac_step"] - s["base_step"] - s["factor_update"] - s["precondition"] \
        - refresh_per_call * refresh_in_steps
    per_step = {
        "forward+backward (excl. factor stats)": (s["fwd_bwd"] - stats_total) / steps,
        "factor statistics in hooks (a^T a, g^T g)": stats_total / max(captures, 1) / fus,
        "factor update (running average)": s["factor_update"] / max(c["factor_update"], 1) / fus,
        "eigendecomposition refresh": refresh_per_call / ius,
        "preconditioning": s["precondition"] / steps,
        "base optimizer step (SGD)": s["base_step"] / steps,
        "other K-FAC bookkeeping (grad gather, finiteness check, ...)": other_kfac / steps,
        "zero_grad": s["zero_grad"] / steps,
    }
    total = sum(per_step.values())
    return {
        "schedule": {"factor_update_steps": fus, "inv_update_steps": ius}, "method": "eigen",
        "profiled_steps": steps, "first_step": first, "factor_update_steps_in_window": captures,
        "refresh_calls_measured": c["refresh"],
        "amortised_ms_per_step": {k: 1e3 * v for k, v in per_step.items()},
        "amortised_total_ms_per_step": 1e3 * total,
        "fraction": {k: v / total for k, v in per_step.items()},
        "per_call_ms": {k: 1e3 * s[k] / c[k] for k in s if c[k]},
        "calls": dict(c), "total_seconds": dict(s),
        "top_layers_ms_per_call": {"refresh (eigh)": timer.slowest_layers("refresh_layer"),
                                   "precondition": timer.slowest_layers("precondition_layer"),
                                   "factor statistics (a^T a)": timer.slowest_layers("stats_a"),
                                   "factor statistics (g^T g)": timer.slowest_layers("stats_g")},
        "sgd_same_steps_ms_per_step": {"forward+backward": 1e3 * sgd_fwdbwd / steps,
                                       "full step": 1e3 * sgd_step / steps},
    }


def format_profile(p: dict[str, Any]) -> str:
    sch = p["schedule"]
    lines = [f"Profile: eigen K-FAC at ({sch['factor_update_steps']},{sch['inv_update_steps']}), "
             f"{p['profiled_steps']} steps from step {p['first_step']} + {p['refresh_calls_measured']} refresh(es); "
             "amortised over the schedule:",
             f"{'phase':<62s} {'ms/step':>9s} {'share':>7s}", "-" * 80]
    for k, v in p["amortised_ms_per_step"].items():
        lines.append(f"{k:<62s} {v:9.1f} {100 * p['fraction'][k]:6.1f}%")
    lines.append(f"{'total (amortised estimate)':<62s} {p['amortised_total_ms_per_step']:9.1f}")
    sgd = p["sgd_same_steps_ms_per_step"]
    lines.append(f"(plain SGD in the same loop: forward+backward {sgd['forward+backward']:.1f} ms, "
                 f"full step {sgd['full step']:.1f} ms)")
    for phase, layers in p["top_layers_ms_per_call"].items():
        lines.append(f"slowest layers, {phase} (ms per call): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in list(layers.items())[:5]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path, *, title: str, show_reference: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    methods = [m for m in METHODS + ("eigen-truncated",) + KAISA_METHODS
               if m != "sgd" and any(r["method"] == m for r in rows)]
    show_reference = show_reference and not any(m in KAISA_METHODS for m in methods)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"eigen": "tab:blue", "inverse": "tab:orange", "eigen-truncated": "tab:green", "kaisa-eigen": "tab:cyan", "kaisa-inverse": "tab:red"}
    ref_labelled = False
    for j, method in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, sch in enumerate(schedules):
            row = next(r for r in rows if r["schedule"] == sch and r["method"] == method)
            x = i + (j - (len(methods) - 1) / 2) * width
            xs.append(x)
            ys.append(row["ratio_vs_sgd"])
            lo.append(max(row["ratio_vs_sgd"] - row["ratio_vs_sgd_paired_min"], 0))
            hi.append(max(row["ratio_vs_sgd_paired_max"] - row["ratio_vs_sgd"], 0))
            top = max(row["ratio_vs_sgd"], row["ratio_vs_sgd_paired_max"])
            ax.annotate(f"{row['ratio_vs_sgd']:.1f}x", (x, top), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
            ref = KAISA_REFERENCE.get((row["factor_update_steps"], row["inv_update_steps"]))
            if show_reference and method == "eigen" and ref is not None:
                ax.hlines(ref, x - width / 2, x + width / 2, colors="crimson", linestyles="--", lw=2, zorder=5,
                          label=None if ref_labelled else
                          "KAISA eigen: reported reference, not measured in this run")
                ax.annotate(f"KAISA {ref:g}x\n(reported, not measured)", (x, ref), textcoords="offset points",
                            xytext=(0, 4), ha="center", fontsize=7, color="crimson", zorder=6,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
                ref_labelled = True
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[method],
               label=(f"KAISA compute_method={method.removeprefix('kaisa-')} (measured)" if method in KAISA_METHODS
                      else f"kfac.KFAC method=eigen, truncate={TRUNCATE.get('truncate')} (measured)"
                      if method == "eigen-truncated" else f"kfac.KFAC method={method} (measured)"))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(schedules)), [f"{s}\n(factor_update_steps, inv_update_steps)" for s in schedules])
    ax.set_ylabel("ms/step relative to plain SGD (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max([r["ratio_vs_sgd_paired_max"] for r in rows] + (
        list(KAISA_REFERENCE.values()) if show_reference else [])) * 1.15)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)


def plot_title(result: dict[str, Any]) -> str:
    st, m = result["settings"], result["machine"]
    size = result.get("image_size", 32)
    return (f"kfac.KFAC per-step time / SGD: {result['model']}, {size}x{size}, batch {result['batch_size']}, "
            f"CPU, {st['threads']} thread(s)\n{m['cpu_model']}, torch {m['torch']}, synthetic data, "
            f"median of {st['repeats']} (error bars: paired per-repeat min-max)")


def log(msg: str) -> None:
    print(msg, flush=True)


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

    json_path = args.out_dir / f"step_overhead{suffix}.json"
    log("")
    write_results(json_path, result, RAW_KEYS, raw=args.raw, embed_raw=args.quick, indent=2, default=str)
    if rows:
        png_path = args.out_dir / f"step_overhead{suffix}.png"
        plot(rows, png_path, title=plot_title(result), show_reference=not args.quick)
        log(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
