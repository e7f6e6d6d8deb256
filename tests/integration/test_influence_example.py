"""The influence example (examples/influence_digits.py) and the influence benchmark (benchmarks/cpu/influence.py --quick).

Both scripts run as subprocesses, as a user would run them (offline: scikit-learn's bundled digits), writing into
a temporary directory; the LDS helper is also checked on constructed cases.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_script(rel: str, *args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / rel), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{rel} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, path


def test_influence_example_writes_a_grid_and_a_sane_table(tmp_path):
    k, nq = 3, 3
    out = run_script("examples/influence_digits.py", "--num-queries", str(nq), "--top-k", str(k),
                     "--out-dir", str(tmp_path))
    assert "top helpful" in out and "top harmful" in out
    assert_png(tmp_path / "influence_digits.png", min_bytes=20_000)
    result = json.loads((tmp_path / "influence_digits.json").read_text())
    assert result["method"] == "ekfac" and result["top_k"] == k and len(result["queries"]) == nq
    for q in result["queries"]:
        assert q["misclassified"] and q["true"] != q["pred"]  # the trained CNN misclassifies > 3 test digits
        assert str(q["query"]) in result["table"]
        helpful = [h["score"] for h in q["helpful"]]
        harmful = [h["score"] for h in q["harmful"]]
        assert all(math.isfinite(s) for s in helpful + harmful)
        assert helpful == sorted(helpful, reverse=True) and harmful == sorted(harmful)
        assert helpful[0] > 0 > harmful[0]
        assert not {h["train_idx"] for h in q["helpful"]} & {h["train_idx"] for h in q["harmful"]}
    # EK-FAC on digits: helpful examples mostly share the query's true label, harmful ones carry the wrongly
    # predicted label (chance: ~k * nq / 10 = 0.9; seeds 0-4 at the default 15 epochs give >= 5/12 and >= 5/12
    # with 4 queries). Loose bounds: > 3x chance.
    assert result["helpful_same_true_label"] >= 3, result["table"]
    assert result["harmful_same_pred_label"] >= 3, result["table"]


def test_influence_benchmark_quick_run(tmp_path):
    out = run_script("benchmarks/cpu/influence.py", "--quick", "--out-dir", str(tmp_path), timeout=240)
    assert "LDS" in out and "kronfluence" in out
    assert_png(tmp_path / "influence_quick.png")
    res = json.loads((tmp_path / "influence_quick.json").read_text())
    assert res["quick"] is True and set(res["methods"]) == {"identity", "kfac", "ekfac", "ekfac_sampled", "mfac"}
    nq = res["queries"]["count"]
    assert nq == res["config"]["queries"] == 20 and res["subsets"]["count"] == 10
    assert res["model"]["test_accuracy"] > 0.9 and res["model"]["grad_norm"] < 1e-3  # trained to convergence
    for name, m in res["methods"].items():
        for key in ("lds", "lds_misclassified", "lds_correct"):
            assert math.isfinite(m[key]) and -1 <= m[key] <= 1, (name, key, m[key])
        assert len(m["lds_per_query"]) == nq and m["queries_with_nan"] == 0
        assert m["fit_s"] >= 0 and m["score_s"] > 0 and m["throughput_pairs_per_s"] > 0
        mem = m["memory_bytes"]
        assert mem["queries"] > 0 and mem["train_batch"] > 0
        assert (mem["fitted"] > 0) == (name != "identity") and mem["fitted_held"] >= mem["fitted"]
    assert math.isfinite(res["paired_lds_differences"]["ekfac-identity"]["mean"])
    for rows in res["damping_sweep"].values():
        assert [r["damping"] for r in rows] == res["config"]["damping_sweep"]
        assert all(-1 <= r["lds"] <= 1 for r in rows)
    machine = res["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "threads", "date_utc"):
        assert machine[key] is not None, key


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("influence_benchmark", ROOT / "benchmarks" / "cpu" / "influence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lds_helper(bench):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 30, generator=g)
    masks = torch.rand(12, 30, generator=g) < 0.5
    exact = -(masks.double() @ scores.double().T)  # losses that the scores predict perfectly (higher score: lower)
    torch.testing.assert_close(bench.lds_per_query(scores, masks, exact), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(bench.lds_per_query(-scores, masks, exact), -torch.ones(4, dtype=torch.float64))
    losses = torch.randn(12, 4, generator=g, dtype=torch.float64)
    from scipy.stats import spearmanr

    want = [spearmanr((masks.double() @ scores[q].double()).numpy(), -losses[:, q].numpy())[0] for q in range(4)]
    torch.testing.assert_close(bench.lds_per_query(scores, masks, losses), torch.tensor(want, dtype=torch.float64))
    constant = bench.lds_per_query(scores, masks, torch.ones(12, 4, dtype=torch.float64))
    assert constant.isnan().all()
    summary = bench.summarise(torch.tensor([0.5, float("nan"), 0.1]), n_wrong=1)
    assert summary["lds"] == pytest.approx(0.3) and summary["queries_with_nan"] == 1
