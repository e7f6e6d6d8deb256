"""``--profile``: a phase breakdown of eigen K-FAC steps, by wrapping methods of one optimizer instance with timers."""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor

import kfac
from benchmarks.common import count_events, gc_paused
from benchmarks.cpu.overhead.configs import TRUNCATE, Config
from benchmarks.cpu.overhead.runners import make_runner


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
    with gc_paused():
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


