"""``examples/demo.py`` (``make demo``) end to end in its ``--quick`` form: three 2-process torchrun jobs of a few
steps each (SGD, K-FAC, EK-FAC), then the table, ``demo.json``, ``demo.png`` and the TensorBoard pointers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.timeout(240)]
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(DEMO), "--quick", "--out-dir", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    stdout = proc.stdout

    # the table: a header and one row per optimizer
    assert "optimizer" in stdout and "test acc" in stdout and "K-FAC MiB/step" in stdout
    first = stdout.split("[demo] where K-FAC pays off")[0]  # the ResNet table comes before the payoff stage's
    rows = {line.split()[0]: line.split() for line in first.splitlines()
            if line.split() and line.split()[0] in ("sgd", "kfac", "ekfac")}
    assert set(rows) == {"sgd", "kfac", "ekfac"}, stdout
    assert rows["sgd"][-1] == "-"  # no K-FAC traffic for SGD

    # where to look next
    assert f"tensorboard --logdir {out}" in stdout
    assert str(out / "demo.png") in stdout and str(out / "demo.json") in stdout

    png, js = out / "demo.png", out / "demo.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    assert data["quick"] is True and data["nproc"] >= 1
    results = {r["optimizer"]: r for r in data["results"]}
    assert list(results) == ["sgd", "kfac", "ekfac"]
    for name, r in results.items():
        assert r["steps"] == 4, (name, r)
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "wall_time_s",
                    "time_per_step_ms", "optimizer_step_ms"):
            assert math.isfinite(r[key]), (name, key, r[key])
        assert 0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0 and r["wall_time_s"] > 0
        assert [s for s, _ in r["curves"]["train_loss"]] == [2, 4]
        assert [s for s, _ in r["curves"]["test_accuracy"]] == [4]
        assert list((out / name).glob("events.out.tfevents.*")), name
    assert results["sgd"]["comm_MiB_per_step"] is None
    if data["nproc"] > 1:  # factors are all-reduced between the ranks
        for name in ("kfac", "ekfac"):
            assert results[name]["comm_MiB_per_step"] > 0 and math.isfinite(results[name]["comm_MiB_per_step"])
    # the payoff stage: the autoencoder by SGD, AdamW, Muon and adaptive K-FAC on the same processes, seed, budget
    payoff = {r["optimizer"]: r for r in data["payoff"]}
    assert list(payoff) == ["sgd", "adamw"] + (["muon"] if hasattr(torch.optim, "Muon") else []) + ["adaptive"]
    best = min((r for k, r in payoff.items() if k != "adaptive"), key=lambda r: r["curve"][-1][1])
    assert f"steps to {best['optimizer']} final" in stdout and str(out / "demo_payoff.png") in stdout
    for name, r in payoff.items():
        assert r["steps"] == 20 and r["world_size"] == data["nproc"], (name, r)
        assert [s for s, _ in r["curve"]] == [0, 5, 10, 15, 20]
        assert all(math.isfinite(v) and v > 0 for _, v in r["curve"]), (name, r["curve"])
        assert r["curve"][0][1] == payoff["sgd"]["curve"][0][1]  # same initial weights
    target = best["curve"][-1][1]
    for r in payoff.values():  # the reported step is the first evaluation at or below the best first-order final
        hit = next((s for s, v in r["curve"] if v <= target), None)
        assert r["steps_to_best_final"] == hit
    assert (out / "demo_payoff.png").stat().st_size > 10_000
