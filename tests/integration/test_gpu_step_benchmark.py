"""benchmarks/gpu/gpu_step.py (issue 7): the CPU smoke run writes well-formed outputs; the real run on a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "gpu_step.py"
QUICK_CONFIGS = ("sgd", "kfac-eigen", "kfac-inverse", "ekfac", "mfac")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _run(args: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, **env})


def _check_rows(data: dict, configs: tuple[str, ...]) -> None:
    rows = {r["config"]: r for r in data["summary"]}
    assert tuple(rows) == configs
    assert rows["sgd"]["ratio_vs_sgd"] == 1.0 and rows["sgd"]["goal_met"] is None
    for name, r in rows.items():
        assert _finite(r["ms_per_step_median"]) and r["ms_per_step_median"] > 0, name
        assert _finite(r["ratio_vs_sgd"]) and r["ratio_vs_sgd"] > 0, name
        assert _finite(r["ratio_vs_sgd_paired_median"]), name
        assert _finite(r["plain_step_ms_median"]), name
        assert r["skipped_steps"] == 0, name
        if name != "sgd":
            assert r["goal_met"] == (r["ratio_vs_sgd"] <= data["goal_ratio_vs_sgd"]), name
        if r["kind"] in ("kfac-eigen", "kfac-inverse", "ekfac"):
            # every timed window is whole schedule periods: exactly one refresh per period
            assert r["refresh_steps_timed"] == data["settings"]["repeats"] * data["settings"]["periods"], name
            assert _finite(r["refresh_step_ms_median"]) and _finite(r["factor_update_step_ms_median"]), name
    for name, recs in data["raw"].items():
        for rec in recs:
            assert rec["steps"] == data["settings"]["periods"] * data["schedule"]["inv_update_steps"]
            assert sum(len(v) for v in rec["step_ms"].values()) == rec["steps"]


@pytest.mark.timeout(120)
def test_gpu_step_quick_cpu(tmp_path: Path) -> None:
    proc = _run(["--quick", "--allow-cpu", "--out-dir", str(tmp_path)], timeout=110, OMP_NUM_THREADS="1",
                CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vs SGD" in proc.stdout
    data = json.loads((tmp_path / "gpu_step_quick.json").read_text())
    assert (tmp_path / "gpu_step_quick.png").stat().st_size > 1000
    assert data["goal_ratio_vs_sgd"] == 1.25 and data["settings"]["quick"] is True and data["device"] == "cpu"
    assert data["batch_size"] == 8 and data["image_size"] == 32
    assert data["schedule"] == {"factor_update_steps": 2, "inv_update_steps": 4}
    assert data["failed"] == {}
    for key in ("cpu_model", "torch", "torch_cuda", "cuda_available", "date_utc"):
        assert key in data["machine"], key
    assert "available" in data["ext"]
    _check_rows(data, QUICK_CONFIGS)


def test_gpu_step_refuses_cpu_without_flag(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the script would run the full benchmark")
    proc = _run(["--out-dir", str(tmp_path)], timeout=60, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stdout and "--allow-cpu" in proc.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_step_real_brief(tmp_path: Path) -> None:
    proc = _run(["--periods", "1", "--repeats", "1", "--warmup", "2", "--configs", "kfac-eigen",
                 "--out-dir", str(tmp_path)], timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_step.json").read_text())
    assert data["device"].startswith("cuda") and data["batch_size"] == 64 and data["image_size"] == 224
    assert data["schedule"] == {"factor_update_steps": 10, "inv_update_steps": 100}
    m = data["machine"]
    assert m["gpu_name"] and m["torch_cuda"] and "driver" in m
    _check_rows(data, ("sgd", "kfac-eigen"))
    for r in data["summary"]:
        assert r["peak_bytes"] > 0 and r["state_bytes"] > 0
    assert (tmp_path / "gpu_step.png").stat().st_size > 1000
