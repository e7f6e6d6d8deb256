"""benchmarks/cpu/step_overhead.py --kaisa (issue 16): KAISA runs in its own worker process (its package is also
named ``kfac``) with the benchmark's settings, interleaved with the other configurations, and the table gives ours /
KAISA. KAISA itself is not installable here, so a stand-in package with KAISA's import paths and constructor
records what the worker asked of it; the harness, not KAISA's speed, is under test."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cpu" / "step_overhead.py"

STAND_IN = {
    "kfac/__init__.py": '__version__ = "stand-in"\n',
    "kfac/enums.py": """
        import enum

        class ComputeMethod(enum.Enum):
            EIGEN = 1
            INVERSE = 2
        """,
    "kfac/preconditioner.py": """
        import json
        from pathlib import Path

        LOG = Path(__file__).resolve().parents[1] / "calls.jsonl"

        class KFACPreconditioner:
            def __init__(self, model, **kwargs):
                self.model, self.kwargs = model, kwargs
                self.kwargs["compute_method"] = kwargs["compute_method"].name
                self.steps = 0

            def step(self):
                self.steps += 1
                grads = [p.grad is not None for p in self.model.parameters()]
                with LOG.open("a") as f:
                    f.write(json.dumps({"kwargs": self.kwargs, "step": self.steps, "grads": all(grads)}) + "\\n")
        """,
}


@pytest.mark.timeout(300)
def test_kaisa_runs_in_a_worker_with_the_same_settings_and_is_compared(tmp_path: Path) -> None:
    kaisa, out = tmp_path / "kaisa", tmp_path / "out"
    for rel, text in STAND_IN.items():
        (kaisa / rel).parent.mkdir(parents=True, exist_ok=True)
        (kaisa / rel).write_text(textwrap.dedent(text))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--kaisa", str(kaisa), "--out-dir", str(out),
                           "--schedules", "1,2", "--repeats", "2", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "step_overhead_quick.json").read_text())
    assert Path(data["kaisa"]["package"]) == (kaisa / "kfac").resolve() and data["kaisa"]["version"] == "stand-in"

    calls = [json.loads(line) for line in (kaisa / "calls.jsonl").read_text().splitlines()]
    by_method: dict[str, list[dict]] = {}
    for c in calls:
        by_method.setdefault(c["kwargs"]["compute_method"], []).append(c)
    assert sorted(by_method) == ["EIGEN", "INVERSE"]
    for method, cs in by_method.items():
        # warm-up (1 step) + 2 repeats of one period (2 steps), each after a backward pass
        assert [c["step"] for c in cs] == [1, 2, 3, 4, 5] and all(c["grads"] for c in cs)
        assert cs[0]["kwargs"] == {"factor_update_steps": 1, "inv_update_steps": 2, "lr": 0.1, "damping": 1e-3,
                                   "factor_decay": 0.95, "kl_clip": 1e-3, "compute_method": method}

    rows = {r["method"]: r for r in data["summary"]}
    assert set(rows) == {"sgd", "eigen", "inverse", "kaisa-eigen", "kaisa-inverse"}
    for ours in ("eigen", "inverse"):
        want = rows[ours]["ms_per_step_median"] / rows[f"kaisa-{ours}"]["ms_per_step_median"]
        assert rows[ours]["ratio_vs_kaisa"] == pytest.approx(want)
    windows = data["raw"]["(1,2) kaisa-eigen"]
    assert [w["first_step"] for w in windows] == [1, 3] and all(w["refreshes"] == 1 for w in windows)
    assert "ours / KAISA" in proc.stdout and (out / "step_overhead_quick.png").stat().st_size > 1000


def test_without_kaisa_the_comparison_is_skipped_and_said_so(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-bench", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "KAISA comparison skipped" in proc.stdout, proc.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--kaisa", str(tmp_path), "--no-bench",
                          "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no kfac/preconditioner.py there" in bad.stderr
