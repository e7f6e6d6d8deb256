"""benchmarks/cpu/convergence.py --quick (issue 7): runs end to end and writes a well-formed JSON and a PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cpu" / "convergence.py"
OPTIMIZERS = ("sgd", "adam", "kfac-eigen", "kfac-inverse", "ekfac", "mfac")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.timeout(120)
def test_convergence_quick(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=110, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Time to 90.0% test accuracy" in proc.stdout
    data = json.loads((tmp_path / "convergence_quick.json").read_text())
    assert (tmp_path / "convergence_quick.png").stat().st_size > 1000

    assert data["benchmark"] == "convergence" and data["quick"] is True
    m = data["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "threads", "date_utc", "loadavg_start"):
        assert key in m, key
    assert m["threads"] == 1
    cfg = data["config"]
    assert cfg["target"] == 0.9 and cfg["batch_size"] == 64 and _finite(cfg["max_steps"])
    assert set(cfg["sweep_seeds"]).isdisjoint(cfg["seeds"])
    assert _finite(data["runtime_s"]) and data["runtime_s"] > 0

    assert tuple(data["sweep"]) == OPTIMIZERS and tuple(data["report"]) == OPTIMIZERS
    sizes = {len(s["grid"]) for s in data["sweep"].values()}
    assert sizes == {cfg["grid_points"]}  # same sweep budget for every optimizer
    for name, sweep in data["sweep"].items():
        assert sweep["chosen_lr"] in sweep["grid"]
        assert all(_finite(lr) and lr > 0 for lr in sweep["grid"])
        assert [e["lr"] for e in sweep["entries"]] == sweep["grid"]
        assert all(len(e["seed_runs"]) == len(cfg["sweep_seeds"]) for e in sweep["entries"])

    for name, rep in data["report"].items():
        assert rep["lr"] == data["sweep"][name]["chosen_lr"]
        assert rep["runs"] == len(cfg["seeds"]) and 0 <= rep["reached"] <= rep["runs"]
        assert _finite(rep["median_time_per_step_ms"]) and rep["median_time_per_step_ms"] > 0
        if rep["reached"]:
            for key in ("median_steps", "min_steps", "max_steps", "median_wall_s", "min_wall_s", "max_wall_s"):
                assert _finite(rep[key]) and rep[key] > 0, (name, key)
            assert rep["min_steps"] <= rep["median_steps"] <= rep["max_steps"] <= cfg["max_steps"]
            assert rep["min_wall_s"] <= rep["median_wall_s"] <= rep["max_wall_s"]
        curve = rep["median_curve"]
        assert len(curve["step"]) == len(curve["test_accuracy"]) == len(curve["wall_s"]) > 1
        assert all(_finite(v) and 0 <= v <= 1 for v in curve["test_accuracy"])
        assert all(_finite(v) for v in curve["wall_s"]) and curve["wall_s"] == sorted(curve["wall_s"])
        for r in rep["seed_runs"]:
            assert r["optimizer"] == name and r["lr"] == rep["lr"] and not r["diverged"]
            assert _finite(r["wall_s"]) and r["steps_run"] == cfg["max_steps"]
            if r["reached"]:
                assert r["curve"]["test_accuracy"][r["curve"]["step"].index(r["steps_to_target"])] >= cfg["target"]
    # SGD learns in the quick run (90% of digits within 60 steps), so the ratios are defined.
    sgd = data["report"]["sgd"]
    assert sgd["reached"] == sgd["runs"] and sgd["steps_ratio_vs_sgd"] == 1.0
    assert all(_finite(r["steps_ratio_vs_sgd"]) for r in data["report"].values() if r["reached"] == r["runs"])
