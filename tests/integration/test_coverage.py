"""benchmarks/cpu/coverage.py (issue 15): the share of trainable parameters K-FAC preconditions on common
architectures built from random configurations, after one statistics step: >= 99% on every one (issue 15's goal),
all of ViT, ConvNeXt and BERT (their loose parameters -- class token, position embedding, layer scales, the
prediction head's bias -- in diagonal blocks, issue 22 item 5), and the accounting adds up (preconditioned + left
out by reason = all trainable parameters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
GOAL = 0.99


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preconditioned_share_of_parameters(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu" / "coverage.py"), "--out-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "coverage.json").read_text())["models"]
    assert {"conv1d net", "nn.TransformerEncoder", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
            "vit_b_16"} <= set(rows)
    for name, row in rows.items():
        assert row["preconditioned"] + sum(row["skipped_parameters_by_reason"].values()) == row["parameters"], name
        assert row["fraction"] >= GOAL, (name, row)
    assert rows["conv1d net"]["fraction"] == 1.0
    # loose parameters of containers (ViT's class token and position embedding, ConvNeXt's layer scales, BERT's
    # output bias) have blocks that collected their statistics at the step
    for name in ("vit_b_16", "convnext_tiny", "bert (tiny)"):
        if name in rows:
            assert rows[name]["fraction"] == 1.0 and not rows[name]["skipped_parameters_by_reason"], (name, rows[name])
    if "llama (tiny)" in rows:  # Hugging Face's LlamaRMSNorm (by torch.func) and everything else
        assert rows["llama (tiny)"]["fraction"] == 1.0, rows["llama (tiny)"]
