"""examples/gpt_influence.py --quick: a small GPT on standard-library docstrings by AdamW and K-FAC, then per-token
influence of the training sequences on a generated continuation. Runs as a user would run it (subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_gpt_influence_example_runs_and_its_per_token_scores_add_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gpt_influence.py"), "--quick", "--prompt", "The ",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=220, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpt_influence.json").read_text())
    for name in ("adamw", "kfac"):
        assert math.isfinite(out[name]["corpus_loss"]) and out[name]["corpus_loss"] < math.log(95)  # below uniform
    assert out["continuation"].startswith("The ") and len(out["continuation"]) > len("The ")
    assert len(out["top"]) == 3
    scores = [row["score"] for row in out["top"]]
    assert scores == sorted(scores, reverse=True)
    for row in out["top"]:
        assert sum(row["per_token"]) == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        assert len(row["per_token"]) == len(row["text"])
    assert "most supporting training sequences" in proc.stdout
