"""benchmarks/cpu/time_to_result.py --quick (issue 14): runs end to end; its summary is consistent with its runs (the
target is the best first-order peer's median final metric, ratios are against that peer) and no K-FAC-family run
writes a non-finite parameter."""

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
SCRIPT = ROOT / "benchmarks" / "cpu" / "time_to_result.py"


@pytest.mark.timeout(300)
def test_time_to_result_quick(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "time_to_result_quick.json").read_text())
    assert (tmp_path / "time_to_result_quick.png").stat().st_size > 1000
    for name, w in data["workloads"].items():
        rows = w["rows"]
        higher = name == "classification"
        peers = {k: r for k, r in rows.items() if k in ("sgd", "adamw", "muon", "soap")}
        best = max(peers.values(), key=lambda r: r["final"]) if higher else min(peers.values(), key=lambda r: r["final"])
        assert w["target"] == best["final"] and rows[w["best_peer"]]["final"] == w["target"]
        assert rows[w["best_peer"]]["steps_ratio"] == 1.0
        reached = [r["steps_to_target"] for r in peers.values() if not math.isnan(r["steps_to_target"])]
        assert rows[w["fastest_peer"]]["steps_to_target"] == min(reached)  # the best peer reaches its own final
        for k, r in rows.items():
            if k in ("kfac", "adaptive"):
                assert r["diverged_or_non_finite"] == 0, (name, k)
            if not math.isnan(r["steps_to_target"]):
                assert r["steps_ratio"] == pytest.approx(r["steps_to_target"] / rows[w["best_peer"]]["steps_to_target"])
        assert rows["adaptive"]["lr"] is None  # no tuning
