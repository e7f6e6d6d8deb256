"""benchmarks/cpu/influence_index.py and two_stage.py --quick: they run end to end and what they record is
consistent with what they measure: an index whose ``k`` covers every dimension scores exactly as exhaustive EK-FAC
(LDS change 0) at a fraction of the raw gradients' bytes; the index answers faster than a pass over the corpus;
two-stage recall is a share in [0, 1] that does not fall as the candidate fraction grows to the whole corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu"


def run(script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out-dir", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_index_benchmark_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    run("influence_index.py", tmp_path, "--dims", "8,200", "--subsets", "4", "--queries", "6", "--corpus", "800")
    record = json.loads((tmp_path / "influence_index_quick.json").read_text())
    assert {"git_commit", "tree_clean"} <= set(record["machine"])
    exhaustive, small, full = record["lds"]["rows"]
    assert exhaustive["scoring"] == "exhaustive" and exhaustive["compression"] == 1.0
    assert full["k"] == 200 and full["lds_change"] == pytest.approx(0.0, abs=1e-3)  # exact (float16 storage)
    assert full["compression"] > 10 and small["compression"] > full["compression"]
    assert -1 <= small["lds"] <= 1
    speed = record["speed"]
    assert speed["corpus"] == 800 and speed["qps_index"] > speed["qps_exhaustive"] > 0
    assert speed["bytes_per_example"] < speed["raw_bytes_per_example"]
    assert (tmp_path / "influence_index_quick.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_two_stage_benchmark_quick(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    run("two_stage.py", tmp_path, "--fractions", "0.05,1.0")
    record = json.loads((tmp_path / "two_stage_quick.json").read_text())
    for generator in record["generators"]:
        rows = [r for r in record["fractions"] if r["generator"] == generator]
        assert [r["fraction"] for r in rows] == [0.05, 1.0]
        assert all(0 <= r["recall_at_k"] <= 1 for r in rows)
        assert rows[-1]["recall_at_k"] == 1.0  # every training sequence a candidate: the exhaustive top-k
        assert rows[0]["candidates"] < rows[-1]["candidates"] == record["corpus"]["train_sequences"]
    assert (tmp_path / "two_stage_quick.png").stat().st_size > 0
