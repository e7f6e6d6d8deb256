"""The GPU step-time benchmark's PNG: each configuration's step time relative to SGD against the goal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import save_png
from benchmarks.gpu.step.configs import GOAL


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio_vs_sgd"] is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ys = [r["ratio_vs_sgd"] for r in rows]
    lo = [max(r["ratio_vs_sgd"] - (r["ratio_vs_sgd_paired_min"] or r["ratio_vs_sgd"]), 0) for r in rows]
    hi = [max((r["ratio_vs_sgd_paired_max"] or r["ratio_vs_sgd"]) - r["ratio_vs_sgd"], 0) for r in rows]
    colors = ["gray" if r["kind"] == "sgd" else ("tab:green" if r["goal_met"] else "tab:red") for r in rows]
    ax.bar(xs, ys, 0.6, yerr=[lo, hi], capsize=3, color=colors)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio_vs_sgd']:.2f}x\n{r['ms_per_step_median']:.1f} ms", (x, r["ratio_vs_sgd"]),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.axhline(GOAL, color="crimson", ls="--", lw=1.2, label=f"goal <= {GOAL}x SGD")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), [r["config"] for r in rows], fontsize=8)
    ax.set_ylabel("amortised ms/step relative to SGD (median)")
    ax.set_ylim(0, max(ys + [GOAL] + [r["ratio_vs_sgd_paired_max"] or 0 for r in rows]) * 1.25)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)


