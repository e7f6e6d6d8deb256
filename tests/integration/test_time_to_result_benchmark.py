"""benchmarks/cpu/time_to_result.py and batch_scaling.py --quick (issue 14): they run end to end on every workload; their
summaries are consistent with their runs (the target is the best first-order peer's median final metric, ratios are
against that peer, steps to target follow from the runs' curves) and no K-FAC-family run writes a non-finite
parameter."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks" / "cpu"
PEERS = ("sgd", "adamw", "muon", "soap")


def run_quick(script: str, out: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out-dir", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def best(values: list[float], higher: bool) -> float:
    return max(values) if higher else min(values)


def median_steps(values: list[float]) -> float:
    """The benchmark's median of steps: a run that never reached the target counts as infinitely late."""
    value = statistics.median(math.inf if math.isnan(v) else v for v in values)
    return math.nan if math.isinf(value) else value


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def steps_from_curve(curve: list[float], target: float, w: dict[str, Any]) -> float:
    for i, v in enumerate(curve):
        if not math.isnan(v) and (v >= target if w["higher_is_better"] else v <= target):
            return float(i * w["eval_every"])
    return math.nan


@pytest.mark.timeout(900)
def test_time_to_result_quick(tmp_path: Path) -> None:
    run_quick("time_to_result.py", tmp_path)
    data = json.loads((tmp_path / "time_to_result_quick.json").read_text())
    assert (tmp_path / "time_to_result_quick.png").stat().st_size > 1000
    assert set(data["workloads"]) == {"autoencoder", "classification", "cnn", "lm"} and data["seeds"] == [0]
    for name, w in data["workloads"].items():
        rows, higher = w["rows"], w["higher_is_better"]
        peers = {k: r for k, r in rows.items() if k in PEERS}
        assert w["target"] == best([r["final"] for r in peers.values()], higher)
        assert rows[w["best_peer"]]["final"] == w["target"]
        assert rows[w["best_peer"]]["steps_ratio"] == 1.0
        reached = [r["steps_to_target"] for r in peers.values() if not math.isnan(r["steps_to_target"])]
        assert rows[w["fastest_peer"]]["steps_to_target"] == min(reached)  # the best peer reaches its own final
        for k, r in rows.items():
            assert len(w["median_curves"][k]) == w["steps"] // w["eval_every"] + 1
            assert same(w["median_curves"][k][-1], r["final"])
            if k in ("kfac", "adaptive"):
                assert r["diverged_or_non_finite"] == 0, (name, k)
            if not math.isnan(r["steps_to_target"]):
                assert r["steps_ratio"] == pytest.approx(r["steps_to_target"] / rows[w["best_peer"]]["steps_to_target"])
                assert r["steps_to_target"] == steps_from_curve(w["median_curves"][k], w["target"], w)  # one seed
        assert rows["adaptive"]["lr"] is None  # no tuning
    assert set(data["workloads"]["cnn"]["rows"]["adaptive"]["extras"]) == {"test_accuracy", "test_loss"}


@pytest.mark.timeout(900)
def test_batch_scaling_quick(tmp_path: Path) -> None:
    run_quick("batch_scaling.py", tmp_path, "--seeds", "1")  # one evaluation seed: the plumbing, in half the time
    data = json.loads((tmp_path / "batch_scaling_quick.json").read_text())
    assert (tmp_path / "batch_scaling_quick.png").stat().st_size > 1000
    assert set(data["workloads"]) == {"cnn", "lm"}
    kinds = data["optimizers"]
    for name, w in data["workloads"].items():
        higher = w["higher_is_better"]
        finals = w["target_peer_finals"]
        assert set(finals) == set(PEERS) & set(kinds)
        assert w["target"] == best(list(finals.values()), higher) == finals[w["target_peer"]]
        assert [b["multiplier"] for b in w["batches"].values()] == data["multipliers"]
        for key, b in w["batches"].items():
            assert int(key) == b["batch"] == w["default_batch"] * b["multiplier"]
            assert list(b["rows"]) == kinds  # one entry per optimizer per batch
            for k, r in b["rows"].items():
                if k == "adaptive":
                    assert r["lr"] is None and r["reached_on_tuning_seed"] is None and r["tuning"] == {}
                else:
                    assert r["lr"] in data["grids"][k] and f"{r['lr']:g}" in r["tuning"]
                    assert r["reached_on_tuning_seed"] == (not math.isnan(r["tuning"][f"{r['lr']:g}"]
                                                                          ["steps_to_target"]))
                assert [run["seed"] for run in r["runs"]] == data["seeds"]
                for run in r["runs"]:
                    assert same(run["steps_to_target"], steps_from_curve(run["curve"], w["target"], w)), (name, key, k)
                    assert run["steps_run"] <= w["steps"]
                    if k in ("kfac", "adaptive"):
                        assert not run["diverged"], (name, key, k)
                assert same(r["steps_to_target"], median_steps([run["steps_to_target"] for run in r["runs"]]))
            reached = {k: r["steps_to_target"] for k, r in b["rows"].items()
                       if k in PEERS and not math.isnan(r["steps_to_target"])}
            if reached:
                assert reached[b["best_peer"]] == min(reached.values())
                assert same(b["adaptive_over_best_peer"], b["rows"]["adaptive"]["steps_to_target"] / min(reached.values()))
            else:
                assert b["best_peer"] is None and b["adaptive_over_best_peer"] is None
