"""benchmarks/cpu/lds_peers.py: the LDS of our influence methods beside the installable peers (kronfluence, TRAK,
dattri). ``--quick`` runs as a user would run it, into a temporary directory; the checks hold with and without the
peer packages installed (a missing peer must be recorded as not run, and the run must go on)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS = {"kronfluence": ("kronfluence_ekfac", "kronfluence_ekfac_heuristic", "kronfluence_kfac",
                         "kronfluence_diagonal"),
         "trak": ("trak",), "dattri": ("dattri_if_explicit", "dattri_if_cg", "dattri_tracin")}
OURS = ("ours_identity", "ours_kfac", "ours_ekfac", "ours_mfac", "ours_ekfac_ggn", "ours_ekfac_hessian")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lds_peers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu" / "lds_peers.py"), "--quick",
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads((out / "lds_peers_quick.json").read_text()), out


@pytest.mark.slow
def test_quick_run_structure_and_content(quick):
    stdout, res, out = quick
    assert "LDS" in stdout and "ours_ekfac" in stdout
    png = (out / "lds_peers_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert res["benchmark"] == "lds_peers" and res["quick"] is True and list(res["models"]) == ["logreg", "mlp"]
    for key in ("cpu_model", "torch", "threads", "date_utc", "peers"):
        assert res["machine"][key] is not None, key
    for mname, m in res["models"].items():
        nq = m["queries"]
        assert nq == res["config"]["queries"] == 10 and m["subsets"]["count"] == 8
        assert m["model"]["test_accuracy"] > 0.9 and m["model"]["grad_norm"] < 1e-3  # trained to convergence
        for name, r in m["methods"].items():
            if not r["ran"]:
                assert r["reason"], (mname, name)
                continue
            assert math.isfinite(r["lds"]) and -1 <= r["lds"] <= 1, (mname, name, r["lds"])
            assert r["lds_se"] >= 0 and r["fit_s"] >= 0 and r["score_s"] > 0, (mname, name)
            assert len(r["lds_per_query"]) == nq and r["queries_with_nan"] == 0, (mname, name)
        for name in OURS:  # ours always run
            assert m["methods"][name]["ran"], (mname, name, m["methods"][name].get("reason"))
    logreg = res["models"]["logreg"]["methods"]
    assert logreg["ours_ekfac"]["lds"] > 0.2
    assert logreg["exact"]["lds"] > 0.5  # exact influence on a strongly convex model predicts retraining well
    assert "ours_ekfac-exact" in res["models"]["logreg"]["paired_lds_differences"]
    assert not res["models"]["mlp"]["methods"]["exact"]["ran"]  # the reference is for the convex model only
    assert any(key.startswith("logreg: ours EK-FAC within") for key in res["goals"])
    # CG with the objective's own L2 as damping converges to exact influence (a linear model's GGN is its Hessian)
    for name in ("ours_ekfac_ggn", "ours_ekfac_hessian"):
        assert logreg[name]["lds"] == pytest.approx(logreg["exact"]["lds"], abs=0.02), name
        assert logreg[name]["settings"]["stopped_negative"] == 0, name


@pytest.mark.slow
@pytest.mark.parametrize("package", sorted(PEERS))
def test_each_peer_ran_or_was_skipped_cleanly(quick, package):
    _, res, _ = quick
    for mname, m in res["models"].items():
        for name in PEERS[package]:
            r = m["methods"][name]
            if installed(package):
                assert r["package_version"] is not None
                if "reason" in r:  # deliberately not run on this model, never a failure
                    assert not r["reason"].startswith("failed"), (mname, name, r["reason"])
                else:
                    assert r["ran"], (mname, name)
            else:  # absent: "not installed", or the reason it is never run on this model (e.g. left to CG)
                assert not r["ran"] and r["package_version"] is None, (mname, name, r)
                assert "not installed" in r["reason"] or not r["reason"].startswith("failed"), (mname, name, r)


@pytest.mark.slow
def test_dattri_exact_influence_agrees_with_ours(quick):
    pytest.importorskip("dattri")
    _, res, _ = quick
    logreg = res["models"]["logreg"]["methods"]
    assert logreg["dattri_if_explicit"]["lds"] > 0.5
    # the same quantity (the training objective's exact Hessian), computed by dattri and by our reference
    assert logreg["dattri_if_explicit"]["lds"] == pytest.approx(logreg["exact"]["lds"], abs=0.02)


def test_absent_peers_are_recorded_not_run(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks.cpu import lds_peers
    from benchmarks.cpu.lds_setups import build

    monkeypatch.setattr(lds_peers, "available", lambda package: False)
    args = lds_peers.parse_args(["--quick", "--models", "logreg", "--queries", "4",
                                 "--methods", "ours_ekfac,kronfluence_ekfac,trak,dattri_tracin"])
    records, scores = lds_peers.run_methods(build("logreg", args), args)
    assert set(scores) == {"ours_ekfac"} and records["ours_ekfac"]["ran"]
    for name in ("kronfluence_ekfac", "trak", "dattri_tracin"):
        assert not records[name]["ran"] and "not installed" in records[name]["reason"], records[name]
